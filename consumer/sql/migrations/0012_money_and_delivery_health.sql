-- Issue 18: what each message cost, the spend it adds up to, and delivery-health alerts.

-- Twilio's price of a message, positive, in price_unit (an ISO 4217 code, e.g. USD). Twilio
-- fills it some time after sending; `smsq dispatch` reads it then (the price sweep).
ALTER TABLE sms_notification
    ADD COLUMN price      numeric(12, 5) CHECK (price >= 0),
    ADD COLUMN price_unit text;

-- A message sent again (30001, 30003, ...) cost its first sending too: its superseded SID
-- keeps its own price, and when it was sent.
ALTER TABLE twilio_superseded_sid
    ADD COLUMN sent_datetime timestamptz,
    ADD COLUMN price         numeric(12, 5) CHECK (price >= 0),
    ADD COLUMN price_unit    text;

-- The spend, added up as prices arrive (in the sweep's transaction, so exactly once): by UTC
-- day of sending, sender (notification.sender), destination country (ISO 3166, '' when
-- unknown) and currency. Small, and pruning messages never lowers it.
CREATE TABLE spend_daily (
    day      date    NOT NULL,
    sender   text    NOT NULL,
    country  text    NOT NULL,
    currency text    NOT NULL,
    amount   numeric(16, 5) NOT NULL DEFAULT 0,
    messages bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (day, sender, country, currency)
);

-- Delivery-health alerts in force: one row per episode, from its start until it clears.
-- `smsq serve` writes them (whichever copy inserts the row logs the one error of the
-- episode); the dashboard shows them as a banner.
CREATE TABLE delivery_alert (
    scope            text NOT NULL,  -- 'sender' or 'country'
    key              text NOT NULL,  -- the sender ('' default) or the country code
    reason           text NOT NULL,  -- failure_rate, slow_receipts, carrier_filtering
    value            double precision NOT NULL,
    detail           text NOT NULL DEFAULT '',
    started_datetime timestamptz NOT NULL DEFAULT now(),
    updated_datetime timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key, reason)
);
