with source as (

    select * from {{ ref('raw_payments') }}

),

renamed as (

    select
        id as payment_id,
        order_id,
        payment_method,
        cast(amount_cents as integer) as amount_cents,
        cast(amount_cents / 100.0 as decimal(12, 2)) as amount,
        cast(paid_at as date) as paid_at
    from source

)

select * from renamed
