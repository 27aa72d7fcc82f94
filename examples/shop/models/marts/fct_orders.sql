with orders as (

    select * from {{ ref('stg_orders') }}

),

order_totals as (

    select * from {{ ref('int_order_totals') }}

),

order_payments as (

    select
        order_id,
        count(*) as payment_count,
        sum(amount_cents) as amount_paid_cents,
        sum(amount) as amount_paid
    from {{ ref('stg_payments') }}
    group by order_id

)

select
    orders.order_id,
    orders.customer_id,
    orders.order_date,
    orders.status,
    coalesce(order_totals.line_count, 0) as line_count,
    coalesce(order_totals.unit_count, 0) as unit_count,
    coalesce(order_totals.order_amount, 0) as order_amount,
    coalesce(order_payments.payment_count, 0) as payment_count,
    coalesce(order_payments.amount_paid, 0) as amount_paid,
    coalesce(order_payments.amount_paid_cents, 0)
        >= coalesce(order_totals.order_amount_cents, 0) as is_fully_paid
from orders
left join order_totals
    on orders.order_id = order_totals.order_id
left join order_payments
    on orders.order_id = order_payments.order_id
