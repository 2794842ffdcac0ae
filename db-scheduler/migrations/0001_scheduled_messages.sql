-- The baseline's table: one row per scheduled message.
CREATE TABLE IF NOT EXISTS scheduled_messages (
    id           VARCHAR(255)  NOT NULL,
    topic        VARCHAR(249)  NOT NULL,
    msg_key      LONGBLOB      NULL,
    msg_value    LONGBLOB      NULL,
    -- JSON: [[name, base64 value or null], ...], so any header bytes survive.
    headers      LONGTEXT      NOT NULL,
    due_at       DATETIME(6)   NOT NULL,
    created_at   DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    delivered_at DATETIME(6)   NULL,
    attempts     INT           NOT NULL DEFAULT 0,
    status       ENUM('pending', 'delivered', 'failed') NOT NULL DEFAULT 'pending',
    error        VARCHAR(1024) NULL,
    PRIMARY KEY (id),
    -- The poller's query: WHERE status = 'pending' AND due_at <= ? ORDER BY due_at.
    INDEX idx_pending_due (status, due_at)
) ENGINE = InnoDB;
