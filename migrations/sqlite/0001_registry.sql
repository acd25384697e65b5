-- Users and devices. Secrets are stored only as SHA-256 hashes (hex): they are random
-- 256-bit values, so a fast hash is enough and keeps the auth path cheap.
CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT    NOT NULL UNIQUE,
    email         TEXT    NOT NULL,
    api_key_hash  TEXT    NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL
);

CREATE TABLE devices (
    id            TEXT    PRIMARY KEY,  -- UUID, hyphenated lower case
    user_id       INTEGER NOT NULL REFERENCES users (id),
    name          TEXT    NOT NULL,
    type          TEXT    NOT NULL,
    token_hash    TEXT    NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL
);

CREATE INDEX devices_by_user ON devices (user_id, created_at_ms);
