-- The initial schema: jobs, their events, content-addressed blobs, per-server settings.
CREATE TABLE jobs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id            INTEGER,
    channel_id          INTEGER,
    user_id             INTEGER NOT NULL,
    status              TEXT NOT NULL CHECK (status IN
                          ('queued','submitted','running','succeeded','failed','cancelled','blocked')),
    status_message_id   INTEGER,
    parent_job_id       INTEGER REFERENCES jobs(id),
    backend             TEXT NOT NULL,
    backend_request_id  TEXT,
    status_url          TEXT,
    response_url        TEXT,
    cancel_url          TEXT,
    input_json          TEXT NOT NULL,
    result_json         TEXT,
    error               TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    submitted_at        REAL,
    started_at          REAL,
    finished_at         REAL
);
CREATE INDEX jobs_status ON jobs(status);
CREATE INDEX jobs_user ON jobs(user_id, created_at);
CREATE INDEX jobs_guild ON jobs(guild_id, created_at);

CREATE TABLE job_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL,
    data_json   TEXT,
    created_at  REAL NOT NULL
);
CREATE INDEX job_events_job ON job_events(job_id, id);

CREATE TABLE blobs (
    sha256        TEXT PRIMARY KEY,
    content_type  TEXT NOT NULL,
    size          INTEGER NOT NULL,
    data          BLOB NOT NULL,
    created_at    REAL NOT NULL
);

CREATE TABLE job_blobs (
    job_id  INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    role    TEXT NOT NULL,
    sha256  TEXT NOT NULL REFERENCES blobs(sha256),
    PRIMARY KEY (job_id, role)
);

CREATE TABLE guild_settings (
    guild_id    INTEGER NOT NULL,
    key         TEXT NOT NULL,
    value_json  TEXT NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (guild_id, key)
);
