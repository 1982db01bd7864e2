-- Billing (Stripe): event log, customer links, per-subscription state, payments, refunds, credit
-- grants. Per-user tables are keyed by user_id first; the Stripe event log and the customer
-- lookup are keyed by Stripe's ids (an event may arrive before we know its user).

-- Whether the user's email was verified by the identity provider (Stripe customers are linked
-- by email only when it was).
ALTER TABLE users ADD COLUMN email_verified boolean NOT NULL DEFAULT false;

-- Every Stripe event received, once by id, with what applying it did.
CREATE TABLE stripe_events (
    event_id    text PRIMARY KEY,
    type        text NOT NULL,
    created     timestamptz NOT NULL,          -- Stripe's `created`
    livemode    boolean NOT NULL DEFAULT false,
    customer_id text,
    user_id     uuid,                          -- the user it was applied to, once known
    outcome     text NOT NULL,                 -- applied | ignored:<why> | pending_customer | unhandled_type | …
    received_at timestamptz NOT NULL DEFAULT now(),
    applied_at  timestamptz,
    payload     jsonb NOT NULL
);
CREATE INDEX stripe_events_user ON stripe_events (user_id, created);

-- Stripe customer ↔ user.
CREATE TABLE stripe_customers (
    user_id     uuid NOT NULL,
    customer_id text NOT NULL UNIQUE,
    email       text,
    linked_by   text NOT NULL,                 -- client_reference_id | email | checkout
    linked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, customer_id)
);

-- Events for customers not linked yet: applied (in created order) when the customer is linked.
CREATE TABLE stripe_pending_events (
    customer_id text NOT NULL,
    event_id    text NOT NULL,
    created     timestamptz NOT NULL,
    PRIMARY KEY (customer_id, event_id)
);

-- The latest state of each Stripe subscription (ordered by event created, then
-- current_period_end, then status rank; canceled is terminal).
CREATE TABLE stripe_subscriptions (
    user_id              uuid NOT NULL,
    subscription_id      text NOT NULL,
    customer_id          text NOT NULL,
    price_id             text,
    plan                 text,                 -- through TALLY_STRIPE_PRICES; NULL: unknown price
    stripe_status        text NOT NULL,        -- as Stripe sent it
    status               text NOT NULL,        -- mapped: active | trialing | past_due | canceled | none
    period_start         timestamptz,
    period_end           timestamptz,
    cancel_at_period_end boolean NOT NULL DEFAULT false,
    canceled_at          timestamptz,
    state_created        timestamptz NOT NULL, -- `created` of the event this state comes from
    state_event_id       text NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, subscription_id)
);

-- Invoices paid or failed (payment history). A paid invoice stays paid whatever the order.
CREATE TABLE stripe_payments (
    user_id         uuid NOT NULL,
    invoice_id      text NOT NULL,
    subscription_id text,
    customer_id     text NOT NULL,
    payment_intent  text,
    charge_id       text,
    amount          bigint NOT NULL,           -- minor units (amount_paid, else amount_due)
    currency        text NOT NULL,
    status          text NOT NULL,             -- paid | failed
    first_failed_at timestamptz,               -- earliest invoice.payment_failed
    paid_at         timestamptz,               -- invoice.payment_succeeded `created`
    period_start    timestamptz,
    period_end      timestamptz,
    created         timestamptz NOT NULL,      -- the invoice's own `created`
    PRIMARY KEY (user_id, invoice_id)
);

-- Refunds (charge.refunded), matched to payments by payment intent, charge or invoice.
CREATE TABLE stripe_refunds (
    user_id         uuid NOT NULL,
    charge_id       text NOT NULL,
    payment_intent  text,
    invoice_id      text,
    amount_refunded bigint NOT NULL,
    fully_refunded  boolean NOT NULL,
    currency        text NOT NULL,
    created         timestamptz NOT NULL,
    PRIMARY KEY (user_id, charge_id)
);

-- Credit grants: plan credits per paid invoice (id `inv:<invoice id>`, once per invoice) and
-- admin grants. Consumption is the ledger: events of features whose rule is `credits {cost}`,
-- drawn FIFO by expiry in event-time order (see billing::credits).
CREATE TABLE credit_grants (
    user_id    uuid NOT NULL,
    grant_id   text NOT NULL,
    amount     bigint NOT NULL CHECK (amount > 0),
    source     text NOT NULL,                  -- plan | admin
    reason     text,
    granted_by text,
    invoice_id text,
    valid_from timestamptz NOT NULL,           -- consumption from this instant draws from it
    expires_at timestamptz,                    -- NULL: never (rollover plans, or no expiry given)
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    PRIMARY KEY (user_id, grant_id)
);
