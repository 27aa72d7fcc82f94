-- Order lines priced with the current catalogue price, summed per order.

with order_items as (

    select * from {{ ref('stg_order_items') }}

),

products as (

    select * from {{ ref('stg_products') }}

),

priced_items as (

    select
        order_items.order_id,
        order_items.quantity,
        order_items.quantity * products.price_cents as line_amount_cents
    from order_items
    inner join products
        on order_items.product_id = products.product_id

)

select
    order_id,
    count(*) as line_count,
    sum(quantity) as unit_count,
    sum(line_amount_cents) as order_amount_cents,
    cast(sum(line_amount_cents) / 100.0 as decimal(12, 2)) as order_amount
from priced_items
group by order_id
