with source as (

    select * from {{ ref('raw_products') }}

),

renamed as (

    select
        id as product_id,
        sku,
        name as product_name,
        category,
        cast(price_cents as integer) as price_cents,
        cast(price_cents / 100.0 as decimal(12, 2)) as price
    from source

)

select * from renamed
