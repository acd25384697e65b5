-- Users and devices. Secrets are stored only as SHA-256 hashes (hex): they are random
-- 256-bit values, so a fast hash is enough and keeps the auth path cheap.
CREATE TABLE users (
    id            BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    username      VARCHAR(64)  NOT NULL UNIQUE,
    email         VARCHAR(254) NOT NULL,
    api_key_hash  CHAR(64)     NOT NULL UNIQUE,
    created_at_ms BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE devices (
    id            CHAR(36)     NOT NULL PRIMARY KEY,
    user_id       BIGINT       NOT NULL,
    name          VARCHAR(128) NOT NULL,
    type          VARCHAR(64)  NOT NULL,
    token_hash    CHAR(64)     NOT NULL UNIQUE,
    created_at_ms BIGINT       NOT NULL,
    KEY devices_by_user (user_id, created_at_ms),
    CONSTRAINT devices_user FOREIGN KEY (user_id) REFERENCES users (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
