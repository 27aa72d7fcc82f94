-- Payments attributed to the customer who placed the order, summed per customer.

with payments as (

    select * from {{ ref('stg_payments') }}

),

orders as (

    select * from {{ ref('stg_orders') }}

)

select
    orders.customer_id,
    count(payments.payment_id) as payment_count,
    count(distinct payments.order_id) as paid_order_count,
    sum(payments.amount_cents) as total_paid_cents,
    sum(payments.amount) as total_paid,
    min(payments.paid_at) as first_payment_at,
    max(payments.paid_at) as last_payment_at
from payments
inner join orders
    on payments.order_id = orders.order_id
group by orders.customer_id
