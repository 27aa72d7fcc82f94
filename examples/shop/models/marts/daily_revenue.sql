-- Revenue recognised on the order date for shipped and completed orders.

select
    order_date,
    count(*) as order_count,
    sum(unit_count) as unit_count,
    sum(order_amount) as revenue
from {{ ref('fct_orders') }}
where status in ('shipped', 'completed')
group by order_date
