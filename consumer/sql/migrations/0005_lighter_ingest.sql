-- Every stored message pays for every index it enters; ingest is the hottest path, so the
-- indexes on notification and sms_notification hold only what some query needs.

-- The counts by status come from notification_count_delta (0004); the only query left that
-- filters on status alone is an operator's retry of failed messages, by creation time.
-- Pending and processing rows, nearly all rows at ingest, stay out of this index.
DROP INDEX notification_status_idx;
CREATE INDEX notification_failed_idx ON notification (created_datetime)
    WHERE status IN ('errored', 'failed');

-- A SID is recorded only once Twilio accepted the message: until then there is nothing to
-- keep unique, and no reason for every new row to enter the index with a NULL.
ALTER TABLE sms_notification DROP CONSTRAINT sms_notification_twilio_sid_key;
CREATE UNIQUE INDEX sms_notification_twilio_sid_key ON sms_notification (twilio_sid)
    WHERE twilio_sid IS NOT NULL;
