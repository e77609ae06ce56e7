-- Each notification's history at the cost of one insert per statement, not one trigger call
-- and one insert per row: a claim of 100 rows used to pay 100 PL/pgSQL calls for its events.
-- The row triggers of 0004 become statement triggers over transition tables, so every writer
-- (dispatcher, callbacks, operator actions, pipeline.send_again) is still covered, and the
-- events mean what they meant: one row per change, with the old and new value, the status
-- message or the error code, at clock_timestamp(). A notification's creation is still no
-- event: notification.created_datetime says it, and ingest stays free of it.

DROP TRIGGER notification_status_event ON notification;
DROP FUNCTION notification_status_event();
DROP TRIGGER sms_delivery_status_event ON sms_notification;
DROP FUNCTION sms_delivery_status_event();

-- An UPDATE of notification already ran a statement trigger over its transition tables for
-- the counts (0004); the status events come from the same join of old and new rows, in the
-- same call.
DROP TRIGGER notification_count_updated ON notification;

-- What remains of 0004's count function: inserts and deletes.
CREATE OR REPLACE FUNCTION notification_count_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO notification_count_delta (status, priority, delta)
        SELECT status, priority, count(*) FROM new_rows GROUP BY 1, 2;
    ELSE
        INSERT INTO notification_count_delta (status, priority, delta)
        SELECT status, priority, -count(*) FROM old_rows GROUP BY 1, 2;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION notification_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH changed AS (
        SELECT n.id, o.status AS old_status, o.priority AS old_priority, n.status, n.priority,
               n.status_message
        FROM old_rows o JOIN new_rows n USING (id)
        WHERE o.status <> n.status
    ), events AS (
        INSERT INTO notification_event (notification_id, field, old_value, new_value, message)
        SELECT id, 'status', old_status, status, status_message FROM changed
    )
    INSERT INTO notification_count_delta (status, priority, delta)
    SELECT status, priority, sum(delta) FROM (
        SELECT old_status AS status, old_priority AS priority, -1 AS delta FROM changed
        UNION ALL
        SELECT status, priority, 1 FROM changed
    ) moves GROUP BY 1, 2 HAVING sum(delta) <> 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER notification_status_changed AFTER UPDATE ON notification
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION notification_status_changed();

CREATE FUNCTION sms_delivery_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notification_event (notification_id, field, old_value, new_value, error_code)
    SELECT n.notification_id, 'delivery_status', o.delivery_status, n.delivery_status,
           n.error_code
    FROM old_rows o JOIN new_rows n USING (notification_id)
    WHERE n.delivery_status IS NOT NULL
      AND o.delivery_status IS DISTINCT FROM n.delivery_status;
    RETURN NULL;
END
$$;

CREATE TRIGGER sms_delivery_status_changed AFTER UPDATE ON sms_notification
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION sms_delivery_status_changed();

-- The foreign keys of sms_notification and notification_event to notification checked each
-- row inserted with a lookup and a lock of its notification: about half of the insert of an
-- sms_notification row at ingest, and a second trigger call per event of a claim. Their rows
-- are only ever written with their notification (ingest inserts both in one transaction; the
-- events come from the triggers above), so the check guards nothing. What the keys also did,
-- delete the details with their notification (`smsq prune`, an operator), is now one
-- statement trigger: a delete of 5,000 notifications costs two statements, not 10,000
-- cascaded ones. The details go first: a callback adding an event meanwhile holds the
-- sms_notification row, and once it commits, the events' delete (a statement of its own,
-- with a snapshot of its own) sees its event too.
ALTER TABLE sms_notification DROP CONSTRAINT sms_notification_notification_id_fkey;
ALTER TABLE notification_event DROP CONSTRAINT notification_event_notification_id_fkey;

CREATE FUNCTION notification_details_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- an array of keys: an index scan of each table, however many rows the plan expects
    DELETE FROM sms_notification
    WHERE notification_id = ANY (ARRAY(SELECT id FROM old_rows));
    DELETE FROM notification_event
    WHERE notification_id = ANY (ARRAY(SELECT id FROM old_rows));
    RETURN NULL;
END
$$;

CREATE TRIGGER notification_details_deleted AFTER DELETE ON notification
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION notification_details_deleted();

-- TRUNCATE notification (CASCADE) took the details along through the keys; now through this
-- (a DELETE: a TRUNCATE here fails when the same command truncates those tables too).
CREATE OR REPLACE FUNCTION notification_count_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM notification_count_delta;
    DELETE FROM sms_notification;
    DELETE FROM notification_event;
    RETURN NULL;
END
$$;

-- The same for the key of sms_notification.temporary_media_id: checked for every row stored,
-- nearly all of them without media (a trigger call each, to find the NULL). Ingest stores the
-- media in the row's own transaction; what the key did on delete, forget the media's id
-- (SET NULL), is a statement trigger on the rare deletes of media (serve's cleanup).
ALTER TABLE sms_notification DROP CONSTRAINT sms_notification_temporary_media_id_fkey;

CREATE FUNCTION sms_temporary_media_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sms_notification SET temporary_media_id = NULL
    WHERE temporary_media_id = ANY (ARRAY(SELECT id FROM old_rows));  -- sms_notification_media_idx
    RETURN NULL;
END
$$;

CREATE TRIGGER sms_temporary_media_deleted AFTER DELETE ON sms_temporary_media
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION sms_temporary_media_deleted();
