-- The dispatcher sleeps until the next row of a sender becomes due. Publish times are in
-- notification_due_idx; retry times were not, so finding the next retry meant reading every
-- pending row of the sender. Only rows waiting for a retry are in this index: it stays small.
CREATE INDEX notification_retry_idx
    ON notification (sender, retry_datetime)
    WHERE status = 'pending' AND retry_datetime IS NOT NULL;
