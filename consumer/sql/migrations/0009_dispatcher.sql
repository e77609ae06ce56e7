-- The dispatchers that run, for fair sharing of senders, the dashboard and `smsq status`.
-- A dispatcher is alive while its lock connection is (pg_stat_activity); this table says
-- who it is and what it held when it last wrote. A row whose lock connection is gone is a
-- dispatcher that stopped or died; the next one to tick deletes it after a day.
CREATE TABLE dispatcher (
    holder            text PRIMARY KEY,           -- host:pid, as dispatch_sender.holder
    started_datetime  timestamptz NOT NULL DEFAULT now(),
    updated_datetime  timestamptz NOT NULL DEFAULT now(),
    senders_held      integer NOT NULL DEFAULT 0,
    stopped_datetime  timestamptz                 -- set at a clean stop
);

-- A sender handed over cleanly keeps its bucket for the next holder; one whose holder died
-- starts empty (the dead one may have sent since it last wrote).
ALTER TABLE dispatch_sender ADD COLUMN released_datetime timestamptz;
