-- seatsync schema v1: schedules, bookings, the seat-status table whose unique
-- index decides every race, and the append-only seat event log.

CREATE TABLE schedules (
    id            bigserial PRIMARY KEY,
    title         text        NOT NULL,
    starts_at     timestamptz NOT NULL,
    rows          integer     NOT NULL CHECK (rows BETWEEN 1 AND 100),
    cols          integer     NOT NULL CHECK (cols BETWEEN 1 AND 100),
    blocked       jsonb       NOT NULL DEFAULT '[]',
    -- Per-schedule event counter. Every transaction that changes seats bumps
    -- it as its last write, so the row lock hands out event ids in commit
    -- order (a sequence would not: nextval is taken at insert, not commit).
    last_event_id bigint      NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70); -- room for HOT updates of last_event_id

CREATE TABLE bookings (
    id                  uuid        PRIMARY KEY,
    schedule_id         bigint      NOT NULL REFERENCES schedules (id),
    user_id             uuid        NOT NULL,
    status              text        NOT NULL
                        CHECK (status IN ('PENDING', 'CONFIRMED', 'CANCELLED', 'EXPIRED')),
    seats               jsonb       NOT NULL,
    expires_at          timestamptz NOT NULL,
    idempotency_key     text,
    request_fingerprint text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- One hold at a time per user and schedule, so nobody hoards seats.
CREATE UNIQUE INDEX bookings_one_pending_per_user
    ON bookings (schedule_id, user_id) WHERE status = 'PENDING';

-- An Idempotency-Key names one live booking of its user; once that booking
-- is cancelled or expired the key is free again.
CREATE UNIQUE INDEX bookings_idempotency_key
    ON bookings (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND status IN ('PENDING', 'CONFIRMED');

-- The sweeper's work list.
CREATE INDEX bookings_pending_expiry ON bookings (expires_at) WHERE status = 'PENDING';

-- A row per held or sold seat. The unique index is the guard against double
-- sales: two transactions inserting the same seat cannot both commit.
CREATE TABLE schedule_seat_status (
    schedule_id bigint      NOT NULL REFERENCES schedules (id),
    row_num     smallint    NOT NULL,
    col_num     smallint    NOT NULL,
    booking_id  uuid        NOT NULL REFERENCES bookings (id),
    status      text        NOT NULL CHECK (status IN ('OCCUPIED', 'CONFIRMED')),
    -- Copy of the booking's expiry while OCCUPIED (NULL once CONFIRMED), so a
    -- conflicting insert can tell a live hold from an expired, unswept one.
    expires_at  timestamptz
);

CREATE UNIQUE INDEX schedule_seat_status_seat
    ON schedule_seat_status (schedule_id, row_num, col_num);
CREATE INDEX schedule_seat_status_booking ON schedule_seat_status (booking_id);

-- Append-only log of seat changes, written in the same transaction as the
-- change, so SSE clients can resume and replicas can close gaps after their
-- listener reconnects.
CREATE TABLE seat_events (
    schedule_id bigint      NOT NULL REFERENCES schedules (id),
    event_id    bigint      NOT NULL,
    action      text        NOT NULL CHECK (action IN ('OCCUPIED', 'CONFIRMED', 'RELEASED')),
    seats       jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_id, event_id)
);

CREATE INDEX seat_events_created_at ON seat_events (created_at);
