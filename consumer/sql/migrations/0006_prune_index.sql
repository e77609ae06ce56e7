-- `smsq prune` deletes finished notifications by age. Only finished rows enter this index:
-- a row arrives pending (ingest pays nothing for it), and enters once, when it finishes.
CREATE INDEX notification_finished_idx ON notification (created_datetime)
    WHERE status IN ('sent', 'errored', 'failed', 'canceled');

-- It covers what notification_failed_idx (0005) held, errored and failed rows by creation
-- time, for an operator's retry: one index instead of two entries for each such row.
DROP INDEX notification_failed_idx;
