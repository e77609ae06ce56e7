-- The dashboard's session key: random (a key derived from the password let anyone holding a
-- signed cookie guess the password offline), one for every `smsq serve` copy, replaced when
-- the password changes (password_check, scrypt with password_salt, tells) and by
-- `smsq logout-all`.
CREATE TABLE dashboard_key (
    id                smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    secret            bytea NOT NULL,
    password_salt     bytea NOT NULL,
    password_check    bytea NOT NULL,
    rotated_datetime  timestamptz NOT NULL DEFAULT now()
);

-- One row per login: a session ends on logout (on every copy at once) and 12 hours after its
-- login, whatever its cookie says.
CREATE TABLE dashboard_session (
    id                text PRIMARY KEY,
    user_name         text NOT NULL,
    created_datetime  timestamptz NOT NULL DEFAULT now(),
    expire_datetime   timestamptz NOT NULL
);

-- A replayed callback for an unknown SID is parked once, not once per replay.
DELETE FROM delivery_receipt_early later USING delivery_receipt_early earlier
WHERE later.id > earlier.id AND later.twilio_sid = earlier.twilio_sid
  AND later.delivery_status = earlier.delivery_status
  AND later.error_code IS NOT DISTINCT FROM earlier.error_code;
CREATE UNIQUE INDEX delivery_receipt_early_once_idx
    ON delivery_receipt_early (twilio_sid, delivery_status, coalesce(error_code, -1));
