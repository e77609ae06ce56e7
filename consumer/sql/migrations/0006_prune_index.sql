-- `smsq prune` deletes finished notifications by age. Only finished rows enter this index:
-- a row arrives pending (ingest pays nothing for it), and enters once, when it finishes.
CREATE INDEX notification_finished_idx ON notification (created_datetime)
    WHERE status IN ('sent', 'errored', 'failed', 'canceled');
