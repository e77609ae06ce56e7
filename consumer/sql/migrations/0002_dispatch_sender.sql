-- Each sender's token bucket as its active dispatcher last saw it, for `smsq status` and
-- the dashboard. Written by the dispatcher that holds the sender's advisory lock.
CREATE TABLE dispatch_sender (
    sender            text PRIMARY KEY,          -- '' is the default sender
    address           text NOT NULL,             -- the From number or Messaging Service SID
    holder            text,                      -- host:pid of the dispatcher pacing it
    tokens            double precision NOT NULL,
    rate              double precision NOT NULL, -- segments per second
    capacity          double precision NOT NULL,
    updated_datetime  timestamptz NOT NULL DEFAULT now()
);
