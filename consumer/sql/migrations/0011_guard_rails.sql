-- Guard rails: numbers that receive nothing, caps per recipient, a daily budget per sender.

-- Numbers that receive nothing, with why and since when. `reason`: `opt_out` (the recipient
-- texted a keyword such as STOP to POST /twilio/inbound), `twilio_21610` (Twilio answered
-- "unsubscribed recipient"), `operator` (smsq suppress add, or the dashboard). `detail`: the
-- keyword, Twilio's message or the operator's note. A claim looks each number up here.
CREATE TABLE suppressed_number (
    phone_number      text PRIMARY KEY,               -- E.164
    reason            text NOT NULL,
    detail            text NOT NULL DEFAULT '',
    created_datetime  timestamptz NOT NULL DEFAULT now()
);

-- One row per request made to a number while SMSQ_RECIPIENT_LIMIT is set: written under a
-- lock of that number just before the request (so two dispatchers cannot both take the last
-- place), deleted again when the answer proves nothing was sent. A window is counted by an
-- index range of at most its limit's rows, whatever the table holds; rows older than the
-- longest window are deleted (a BRIN index finds them: the table is appended in time order).
CREATE TABLE recipient_send (
    notification_id   uuid NOT NULL,
    sent_datetime     timestamptz NOT NULL DEFAULT now(),
    phone_number      text NOT NULL,
    PRIMARY KEY (notification_id, sent_datetime)
);
CREATE INDEX recipient_send_number_idx ON recipient_send (phone_number, sent_datetime);
CREATE INDEX recipient_send_time_idx ON recipient_send USING brin (sent_datetime);

-- Segments Twilio accepted per sender and UTC day, for SMSQ_DAILY_SEGMENT_LIMIT: added to as
-- outcomes are recorded; a dispatcher taking a sender over starts from today's row.
CREATE TABLE sender_day_segments (
    sender    text NOT NULL,                           -- as notification.sender
    day       date NOT NULL,                           -- UTC
    segments  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (sender, day)
);

-- What the guard rails of dispatch stopped, per UTC day (`suppressed`, `capped`,
-- `budget_paused`), for smsq status and the dashboard.
CREATE TABLE guard_count (
    day    date NOT NULL,
    guard  text NOT NULL,
    count  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, guard)
);
