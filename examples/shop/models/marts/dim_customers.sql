with customers as (

    select * from {{ ref('stg_customers') }}

),

customer_orders as (

    select
        customer_id,
        min(order_date) as first_order_date,
        max(order_date) as most_recent_order_date,
        count(*) filter (where status <> 'cancelled') as order_count
    from {{ ref('stg_orders') }}
    group by customer_id

),

customer_payments as (

    select * from {{ ref('int_customer_payments') }}

)

select
    customers.customer_id,
    customers.full_name,
    customers.email,
    customers.signup_date,
    customer_orders.first_order_date,
    customer_orders.most_recent_order_date,
    coalesce(customer_orders.order_count, 0) as order_count,
    coalesce(customer_payments.total_paid, 0) as total_paid
from customers
left join customer_orders
    on customers.customer_id = customer_orders.customer_id
left join customer_payments
    on customers.customer_id = customer_payments.customer_id
