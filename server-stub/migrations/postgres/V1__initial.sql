-- WebWaka Realtime server state on PostgreSQL (the same tables as the SQLite engine).
-- Applied by refinery; never edit a migration that shipped: add a new one.

-- The last sequence handed out per tenant. An append locks its tenant's row until its
-- commit, so a tenant's sequences are handed out, and become visible, in order.
CREATE TABLE tenant_seq (
    tenant   TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

-- The durable log: every durable message and bus event of every tenant.
-- Audience: recipient_id (a user), room_id (a room's members), or neither (the whole
-- tenant); the sender always sees what it sent.
CREATE TABLE events (
    tenant       TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    event_id     TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    created_ms   BIGINT NOT NULL,
    recipient_id TEXT,
    room_id      TEXT,
    sender_id    TEXT,
    message_id   TEXT,
    body         TEXT NOT NULL,
    PRIMARY KEY (tenant, seq)
);
CREATE UNIQUE INDEX events_by_id ON events (tenant, event_id);
CREATE UNIQUE INDEX events_by_message_id ON events (tenant, message_id, sender_id)
    WHERE message_id IS NOT NULL;
CREATE INDEX events_by_time ON events (created_ms);

-- Room membership belongs to the user (survives reconnects and restarts).
CREATE TABLE room_members (
    tenant    TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    room_id   TEXT NOT NULL,
    joined_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant, user_id, room_id)
);

-- Consumer groups and their deliveries (state: leased, pending, acked, dead).
CREATE TABLE consumer_groups (
    tenant     TEXT NOT NULL,
    grp        TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    scan_from  BIGINT NOT NULL,
    PRIMARY KEY (tenant, grp)
);
CREATE TABLE group_deliveries (
    tenant           TEXT NOT NULL,
    grp              TEXT NOT NULL,
    seq              BIGINT NOT NULL,
    event_id         TEXT NOT NULL,
    state            TEXT NOT NULL,
    delivery_count   BIGINT NOT NULL,
    consumer_id      TEXT,
    lease_expires_ms BIGINT,
    first_failed_ms  BIGINT,
    last_failed_ms   BIGINT,
    body             TEXT,
    PRIMARY KEY (tenant, grp, seq)
);
CREATE INDEX deliveries_by_state ON group_deliveries (tenant, grp, state, seq);
CREATE INDEX deliveries_by_lease ON group_deliveries (state, lease_expires_ms);
CREATE INDEX deliveries_by_event ON group_deliveries (tenant, grp, event_id);
CREATE TABLE dlq (
    dlq_id          TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    grp             TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    event_id        TEXT NOT NULL,
    body            TEXT NOT NULL,
    failure_reason  TEXT NOT NULL,
    retry_count     BIGINT NOT NULL,
    first_failed_ms BIGINT NOT NULL,
    last_failed_ms  BIGINT NOT NULL,
    consumer_id     TEXT NOT NULL,
    created_ms      BIGINT NOT NULL
);
CREATE INDEX dlq_by_tenant ON dlq (tenant, created_ms);

-- Reconciliation: core's EntityState per entity, as JSON, and the tenant counter
-- (locked by each request until its commit: versions follow the commits).
CREATE TABLE entities (
    tenant      TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    version     BIGINT NOT NULL,
    state       TEXT NOT NULL,
    PRIMARY KEY (tenant, entity_type, entity_id)
);
CREATE INDEX entities_by_version ON entities (tenant, version);
CREATE TABLE entity_counters (
    tenant  TEXT PRIMARY KEY,
    counter BIGINT NOT NULL
);

-- Class D transactions; the idempotency key is scoped to tenant and user. A pending
-- transaction is held by one instance (owner) until lease_until_ms.
CREATE TABLE transactions (
    transaction_id  TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    body_hash       TEXT NOT NULL,
    request         TEXT NOT NULL,
    status          TEXT NOT NULL,
    reason          TEXT,
    received_ms     BIGINT NOT NULL,
    updated_ms      BIGINT NOT NULL,
    submit_audit_id TEXT NOT NULL,
    audit_id        TEXT NOT NULL,
    owner           TEXT,
    lease_until_ms  BIGINT
);
CREATE UNIQUE INDEX transactions_by_key ON transactions (tenant, user_id, idempotency_key);
CREATE INDEX transactions_pending ON transactions (received_ms) WHERE status = 'PENDING';

-- The audit log: one hash chain for all instances, append-only. Appenders take a
-- transaction-scoped advisory lock before reading the head.
CREATE TABLE audit_log (
    sequence         BIGINT PRIMARY KEY,
    audit_id         TEXT NOT NULL UNIQUE,
    tenant_id        TEXT NOT NULL,
    target_tenant_id TEXT,
    body             TEXT NOT NULL,
    hash             TEXT NOT NULL,
    prev_hash        TEXT NOT NULL
);
CREATE INDEX audit_by_tenant ON audit_log (tenant_id, sequence);
CREATE INDEX audit_by_target ON audit_log (target_tenant_id, sequence);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
