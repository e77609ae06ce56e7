-- Twilio's real semantics (DESIGN.md's status rules): senders pause on account-wide errors,
-- unknown outcomes are reconciled in a few checks, and a message Twilio dropped after
-- accepting it is sent again without forgetting the first SID.

-- A sender paused by an account-wide error (20003, 20404, 21611, 63038): its rows stay
-- pending until then. Written by the dispatcher that paces it, for `smsq status` and the
-- dashboard.
ALTER TABLE dispatch_sender
    ADD COLUMN paused_until  timestamptz,
    ADD COLUMN pause_reason  text,
    ADD COLUMN pause_message text;

-- How many times reconciliation asked Twilio about this row's unknown outcome and found
-- nothing: the row is sent again only after every check (outcomes.RECONCILE_DELAYS).
ALTER TABLE sms_notification ADD COLUMN reconcile_checks integer NOT NULL DEFAULT 0;

-- SIDs a notification had before it was sent again (Twilio failed it with 30001 or 30022, or
-- an operator's `smsq retry --undelivered`): still ours, so reconciliation never takes one
-- of them for a new send, and their late callbacks are recognised.
CREATE TABLE twilio_superseded_sid (
    sid               text PRIMARY KEY,
    notification_id   uuid NOT NULL REFERENCES notification (id) ON DELETE CASCADE,
    delivery_status   text,
    error_code        integer,
    superseded_datetime timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX twilio_superseded_sid_notification_idx ON twilio_superseded_sid (notification_id);
