-- Lifetime value = amount of shipped or completed orders; returned and
-- cancelled orders do not count, open (placed) orders are reported apart.

with customers as (

    select * from {{ ref('dim_customers') }}

),

orders as (

    select * from {{ ref('fct_orders') }}

),

customer_order_values as (

    select
        customer_id,
        sum(order_amount) filter (where status in ('shipped', 'completed')) as lifetime_value,
        sum(order_amount) filter (where status = 'placed') as open_order_value,
        count(*) filter (where status = 'returned') as returned_order_count
    from orders
    group by customer_id

)

select
    customers.customer_id,
    customers.full_name,
    customers.order_count,
    coalesce(customer_order_values.lifetime_value, 0) as lifetime_value,
    coalesce(customer_order_values.open_order_value, 0) as open_order_value,
    coalesce(customer_order_values.returned_order_count, 0) as returned_order_count
from customers
left join customer_order_values
    on customers.customer_id = customer_order_values.customer_id
