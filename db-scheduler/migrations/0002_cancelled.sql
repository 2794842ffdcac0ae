-- Cancel by id (issue #13): a cancelled row stays, marked, so that the audit can tell a cancelled
-- message from a lost one.
ALTER TABLE scheduled_messages
    MODIFY status ENUM('pending', 'delivered', 'failed', 'cancelled') NOT NULL DEFAULT 'pending';
