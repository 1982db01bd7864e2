-- Store purchases: one subscription model for Stripe, the App Store and Google Play.

-- The state of every subscription (or plan bought for ever) of a user, per (store, the store's
-- id of it: Stripe `sub_…`, App Store originalTransactionId). Entitlements resolve from these
-- rows; `subscriptions` keeps the one in effect as a summary.
CREATE TABLE store_subscriptions (
    user_id         uuid NOT NULL,
    store           text NOT NULL,             -- app_store | play | stripe
    subscription_id text NOT NULL,
    product_id      text,
    plan            text,                      -- NULL: a product the catalog does not map
    status          text NOT NULL,             -- active | trialing | past_due | canceled | none
    period_start    timestamptz,
    period_end      timestamptz,               -- NULL for a lifetime purchase
    past_due_since  timestamptz,
    access_until    timestamptz,               -- the store's own end of access (expiry, grace end)
    lifetime        boolean NOT NULL DEFAULT false,
    auto_renew      boolean NOT NULL DEFAULT true,
    sandbox         boolean NOT NULL DEFAULT false,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, store, subscription_id)
);

-- Existing Stripe subscriptions, with the past-due state the summary row holds for them.
INSERT INTO store_subscriptions (user_id, store, subscription_id, product_id, plan, status, period_start, period_end, past_due_since, auto_renew)
SELECT ss.user_id, 'stripe', ss.subscription_id, ss.price_id, ss.plan, coalesce(s.status, ss.status), ss.period_start, ss.period_end,
       s.past_due_since, NOT ss.cancel_at_period_end
FROM stripe_subscriptions ss
LEFT JOIN subscriptions s ON s.user_id = ss.user_id AND s.provider_subscription_id = ss.subscription_id;

-- Which user a store purchase belongs to (global look-up by the store's id: App Store
-- originalTransactionId, Play purchase-token lineage). A purchase bound once stays bound.
CREATE TABLE store_bindings (
    store      text NOT NULL,
    store_id   text NOT NULL,
    user_id    uuid NOT NULL,
    bound_by   text NOT NULL,                  -- account_token | caller
    bound_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (store, store_id)
);
CREATE INDEX store_bindings_user ON store_bindings (user_id);

-- Every verified App Store transaction (global look-up by transactionId). The newest
-- signedDate of a transactionId is kept (a revocation re-signs it).
CREATE TABLE apple_transactions (
    transaction_id          text PRIMARY KEY,
    original_transaction_id text NOT NULL,
    user_id                 uuid NOT NULL,
    product_id              text NOT NULL,
    product_type            text NOT NULL,     -- Auto-Renewable Subscription | Non-Consumable | Consumable | …
    purchase_date           timestamptz NOT NULL,
    expires_date            timestamptz,
    signed_date             timestamptz NOT NULL,
    trial                   boolean NOT NULL DEFAULT false,  -- an introductory offer
    revoked_at              timestamptz,
    sandbox                 boolean NOT NULL DEFAULT false,
    price                   bigint,            -- milliunits of `currency`
    currency                text
);
CREATE INDEX apple_transactions_original ON apple_transactions (original_transaction_id, purchase_date);
CREATE INDEX apple_transactions_user ON apple_transactions (user_id);

-- The latest renewal info of an App Store subscription (auto-renew, billing retry, grace).
CREATE TABLE apple_renewals (
    original_transaction_id text PRIMARY KEY,
    user_id                 uuid NOT NULL,
    auto_renew              boolean NOT NULL,
    billing_retry           boolean NOT NULL DEFAULT false,
    grace_until             timestamptz,
    signed_date             timestamptz NOT NULL
);
CREATE INDEX apple_renewals_user ON apple_renewals (user_id);

-- App Store Server Notifications received, once by notificationUUID.
CREATE TABLE apple_notifications (
    notification_uuid text PRIMARY KEY,
    type              text NOT NULL,
    subtype           text,
    user_id           uuid,
    outcome           text NOT NULL,
    received_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX apple_notifications_user ON apple_notifications (user_id);
