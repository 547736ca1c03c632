-- A percentage discount takes a whole number of minor units off the price: the discount is
-- rounded (half up), not the price. £9.99 at 50% off is charged 4.99 (9.99 - 5.00), and the
-- monthly recurring figure now says so too (it said 5.00). Then every kept total is rebuilt.
CREATE OR REPLACE FUNCTION totals_price(amount bigint, percent_off numeric, amount_off bigint)
RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT greatest(0, amount
                       - CASE WHEN percent_off IS NULL THEN 0
                              ELSE totals_muldiv(amount, (percent_off * 10000)::bigint, 1000000)
                         END
                       - coalesce(amount_off, 0))
$$;

SELECT totals_rebuild(scope) FROM (SELECT '*' AS scope UNION ALL SELECT slug FROM campaigns) s;
