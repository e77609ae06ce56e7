-- Each notification's history, and what the dashboard needs to stay fast with millions of rows.

-- One row per change of `notification.status` or `sms_notification.delivery_status`, written
-- by triggers so that no writer (dispatcher, callbacks, operator actions) can forget it.
-- A notification's creation is not an event: `created_datetime` already says it, and ingest
-- stays one insert per message.
CREATE TABLE notification_event (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    notification_id   uuid NOT NULL REFERENCES notification (id) ON DELETE CASCADE,
    -- clock_timestamp(), not now(): events of one long transaction keep their own times
    created_datetime  timestamptz NOT NULL DEFAULT clock_timestamp(),
    field             text NOT NULL CHECK (field IN ('status', 'delivery_status')),
    old_value         text,
    new_value         text NOT NULL,
    message           text NOT NULL DEFAULT '',
    error_code        integer
);

-- A notification's history, in order.
CREATE INDEX notification_event_notification_idx ON notification_event (notification_id, id);

-- Recent errors, grouped by Twilio code on the dashboard.
CREATE INDEX notification_event_error_idx ON notification_event (created_datetime)
    WHERE new_value IN ('errored', 'failed', 'undelivered');

-- Sends per minute over the last hour.
CREATE INDEX notification_sent_idx ON notification (sent_datetime)
    WHERE sent_datetime IS NOT NULL;

CREATE FUNCTION notification_status_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notification_event (notification_id, field, old_value, new_value, message)
    VALUES (NEW.id, 'status', OLD.status, NEW.status, NEW.status_message);
    RETURN NULL;
END
$$;

CREATE TRIGGER notification_status_event
    AFTER UPDATE OF status ON notification
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION notification_status_event();

CREATE FUNCTION sms_delivery_status_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notification_event (notification_id, field, old_value, new_value, error_code)
    VALUES (NEW.notification_id, 'delivery_status', OLD.delivery_status, NEW.delivery_status,
            NEW.error_code);
    RETURN NULL;
END
$$;

CREATE TRIGGER sms_delivery_status_event
    AFTER UPDATE OF delivery_status ON sms_notification
    FOR EACH ROW WHEN (NEW.delivery_status IS NOT NULL
                       AND OLD.delivery_status IS DISTINCT FROM NEW.delivery_status)
    EXECUTE FUNCTION sms_delivery_status_event();

-- The hosted-media cleanup looks for expired media.
CREATE INDEX sms_temporary_media_expire_idx ON sms_temporary_media (expire_datetime);

-- Counts by status and priority without counting a million rows: every statement that
-- inserts, deletes or changes the status of notifications appends its net change here
-- (insert-only, so concurrent writers never wait on each other), and `smsq serve` folds
-- the rows together now and then. The counts are sum(delta) by status and priority.
CREATE TABLE notification_count_delta (
    status    text NOT NULL,
    priority  text NOT NULL,
    delta     bigint NOT NULL
);

-- One function for the three row-changing triggers; each trigger names only the transition
-- tables its operation has, and PL/pgSQL reads only the branch it runs.
CREATE FUNCTION notification_count_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO notification_count_delta (status, priority, delta)
        SELECT status, priority, count(*) FROM new_rows GROUP BY 1, 2;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO notification_count_delta (status, priority, delta)
        SELECT status, priority, -count(*) FROM old_rows GROUP BY 1, 2;
    ELSE
        INSERT INTO notification_count_delta (status, priority, delta)
        SELECT status, priority, sum(delta) FROM (
            SELECT o.status, o.priority, -1 AS delta
            FROM old_rows o JOIN new_rows n USING (id) WHERE o.status <> n.status
            UNION ALL
            SELECT n.status, n.priority, 1
            FROM old_rows o JOIN new_rows n USING (id) WHERE o.status <> n.status
        ) changes GROUP BY 1, 2 HAVING sum(delta) <> 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION notification_count_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM notification_count_delta;
    RETURN NULL;
END
$$;

CREATE TRIGGER notification_count_inserted AFTER INSERT ON notification
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION notification_count_changed();
CREATE TRIGGER notification_count_deleted AFTER DELETE ON notification
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION notification_count_changed();
CREATE TRIGGER notification_count_updated AFTER UPDATE ON notification
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION notification_count_changed();
CREATE TRIGGER notification_count_truncated AFTER TRUNCATE ON notification
    FOR EACH STATEMENT EXECUTE FUNCTION notification_count_truncated();

-- The rows already there: counted once, with writers held off so none is missed or doubled.
LOCK TABLE notification IN SHARE MODE;
INSERT INTO notification_count_delta (status, priority, delta)
SELECT status, priority, count(*) FROM notification GROUP BY 1, 2;

-- A status callback can arrive before the dispatcher has recorded the message's SID (Twilio
-- answers the send, then calls back at once). Such receipts wait here; `smsq serve` applies
-- them once the SID is known and forgets the ones nobody claims within a day.
CREATE TABLE delivery_receipt_early (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    twilio_sid         text NOT NULL,
    delivery_status    text NOT NULL,
    error_code         integer,
    received_datetime  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_receipt_early_sid_idx ON delivery_receipt_early (twilio_sid);
