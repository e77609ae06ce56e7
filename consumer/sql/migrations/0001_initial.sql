-- The tables of the public contract (DESIGN.md), and what the dispatcher's claim needs.

CREATE TABLE notification (
    id                uuid PRIMARY KEY,
    type              text NOT NULL DEFAULT 'sms',
    user_id           text,
    title             varchar(124) NOT NULL DEFAULT '',
    body              text NOT NULL,
    url               text,
    priority          text NOT NULL DEFAULT 'low'
                      CHECK (priority IN ('low', 'medium', 'high')),
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'processing', 'sent', 'errored', 'failed', 'canceled')),
    status_message    text NOT NULL DEFAULT '',
    publish_datetime  timestamptz NOT NULL DEFAULT now(),
    expire_datetime   timestamptz,
    sent_datetime     timestamptz,
    content_type      text,
    object_id         text,
    created_datetime  timestamptz NOT NULL DEFAULT now(),
    -- Ours, for the dispatcher: 0 is sent first. Generated so it can never disagree.
    priority_rank     smallint NOT NULL GENERATED ALWAYS AS (
                          CASE priority WHEN 'high' THEN 0 WHEN 'medium' THEN 1 ELSE 2 END
                      ) STORED,
    -- The From number or Messaging Service that paces this message; '' is the default sender.
    sender            text NOT NULL DEFAULT '',
    -- Not claimed again before this (retry backoff); NULL means as soon as it is due.
    retry_datetime    timestamptz,
    -- While processing: which dispatcher holds it and until when.
    claimed_by        text,
    claimed_datetime  timestamptz,
    lease_expire_datetime timestamptz
);

-- The claim: due pending rows of one sender, highest priority first, then oldest.
CREATE INDEX notification_due_idx
    ON notification (sender, priority_rank, publish_datetime)
    WHERE status = 'pending';

-- Reconciliation and the dashboard look for rows stuck in processing.
CREATE INDEX notification_processing_idx
    ON notification (sender, lease_expire_datetime)
    WHERE status = 'processing';

CREATE INDEX notification_status_idx ON notification (status, priority);

CREATE TABLE sms_temporary_media (
    id                uuid PRIMARY KEY,
    access_token      text NOT NULL UNIQUE,
    name              text NOT NULL,
    content_type      text NOT NULL,
    content           bytea NOT NULL,
    created_datetime  timestamptz NOT NULL DEFAULT now(),
    expire_datetime   timestamptz NOT NULL
);

CREATE TABLE sms_notification (
    notification_id     uuid PRIMARY KEY REFERENCES notification (id) ON DELETE CASCADE,
    to_phone_number     text NOT NULL,
    media_url           text[] NOT NULL DEFAULT '{}',
    temporary_media_id  uuid REFERENCES sms_temporary_media (id) ON DELETE SET NULL,
    twilio_sid          text UNIQUE,
    segments            integer,
    attempts            integer NOT NULL DEFAULT 0,
    error_code          integer,
    delivery_status     text
                        CHECK (delivery_status IN ('queued', 'sent', 'delivered', 'undelivered', 'failed'))
);

CREATE INDEX sms_notification_to_idx ON sms_notification (to_phone_number);
CREATE INDEX sms_notification_media_idx ON sms_notification (temporary_media_id)
    WHERE temporary_media_id IS NOT NULL;
