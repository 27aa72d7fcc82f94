with products as (

    select * from {{ ref('stg_products') }}

),

product_sales as (

    select
        product_id,
        count(distinct order_id) as order_count,
        sum(quantity) as units_ordered
    from {{ ref('stg_order_items') }}
    group by product_id

)

select
    products.product_id,
    products.sku,
    products.product_name,
    products.category,
    products.price,
    coalesce(product_sales.order_count, 0) as order_count,
    coalesce(product_sales.units_ordered, 0) as units_ordered
from products
left join product_sales
    on products.product_id = product_sales.product_id
