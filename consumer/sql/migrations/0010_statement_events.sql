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
