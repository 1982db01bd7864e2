-- Google Play purchases: every verified purchase token as the Play Developer API last
-- described it, the voided orders, and the Real-time Developer Notifications received.

-- One purchase token (global look-up by token). `lineage` is the first token of its chain
-- (`linkedPurchaseToken` links an upgrade, downgrade or resubscription to the token it
-- replaced): the Play subscription's id in store_subscriptions and store_bindings.
CREATE TABLE google_purchases (
    purchase_token  text PRIMARY KEY,
    lineage         text NOT NULL,
    user_id         uuid NOT NULL,
    kind            text NOT NULL,             -- subscription | product
    product_id      text NOT NULL,
    order_id        text,                      -- latest order (subscriptions: of the latest charge)
    state           text NOT NULL,             -- SUBSCRIPTION_STATE_* | PURCHASED | CANCELED | PENDING
    start_time      timestamptz NOT NULL,
    expiry_time     timestamptz,
    auto_renew      boolean NOT NULL DEFAULT false,
    trial           boolean NOT NULL DEFAULT false,
    test            boolean NOT NULL DEFAULT false,  -- a license tester's purchase
    acknowledged    boolean NOT NULL DEFAULT false,
    consumed        boolean NOT NULL DEFAULT false,
    read_at         timestamptz NOT NULL       -- when the API was read (a later read wins)
);
CREATE INDEX google_purchases_lineage ON google_purchases (lineage);
CREATE INDEX google_purchases_user ON google_purchases (user_id);

-- Orders Google voided (refund, chargeback, revocation), once by orderId; kept even when the
-- purchase is not known yet, so a later submission of it is refused its grant.
CREATE TABLE google_voids (
    order_id        text PRIMARY KEY,
    purchase_token  text NOT NULL,
    product_type    integer,                   -- 1 subscription, 2 one-time product
    voided_at       timestamptz NOT NULL
);
CREATE INDEX google_voids_token ON google_voids (purchase_token);

-- Pub/Sub push messages received, once by messageId.
CREATE TABLE google_notifications (
    message_id      text PRIMARY KEY,
    kind            text NOT NULL,             -- subscription | one_time_product | voided_purchase | test
    purchase_token  text,
    user_id         uuid,
    outcome         text NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX google_notifications_user ON google_notifications (user_id);
