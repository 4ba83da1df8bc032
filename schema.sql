-- chatnode schema: accounts, blocks and the auth audit trail. Idempotent.

CREATE TABLE IF NOT EXISTS users (
    id            BIGSERIAL PRIMARY KEY,
    mobile_no     TEXT        NOT NULL UNIQUE,
    name          TEXT        NOT NULL,
    password_hash TEXT        NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen     TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS blocks (
    blocker_id BIGINT      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    blocked_id BIGINT      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (blocker_id, blocked_id)
);
CREATE INDEX IF NOT EXISTS blocks_blocked_idx ON blocks (blocked_id);

CREATE TABLE IF NOT EXISTS auth_events (
    id         BIGSERIAL PRIMARY KEY,
    user_id    BIGINT      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind       TEXT        NOT NULL,
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    node       TEXT        NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_events_user_idx ON auth_events (user_id, at);

-- A user's devices (POST /auth/login's `device`, `default` when absent): at most
-- CHATNODE_MAX_DEVICES each; removed by DELETE /devices/{id} or after
-- CHATNODE_DEVICE_IDLE_DAYS unseen.
CREATE TABLE IF NOT EXISTS devices (
    id         BIGSERIAL PRIMARY KEY,
    user_id    BIGINT      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name       TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (user_id, name)
);
CREATE INDEX IF NOT EXISTS devices_last_seen_idx ON devices (last_seen);

-- The unexpired tokens of each device: removing the device revokes them.
CREATE TABLE IF NOT EXISTS device_tokens (
    jti        TEXT        PRIMARY KEY,
    device_id  BIGINT      NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS device_tokens_device_idx ON device_tokens (device_id);
CREATE INDEX IF NOT EXISTS device_tokens_expiry_idx ON device_tokens (expires_at);

-- Logged-out tokens until they expire; Redis holds a copy for the hot check.
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti        TEXT        PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);
