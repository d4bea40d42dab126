-- Web mask painter sessions (one per link; single use).
CREATE TABLE painter_sessions (
    id              TEXT PRIMARY KEY,
    user_id         INTEGER NOT NULL,
    guild_id        INTEGER,
    channel_id      INTEGER,
    image_sha256    TEXT NOT NULL REFERENCES blobs(sha256),
    requester_json  TEXT NOT NULL,
    params_json     TEXT NOT NULL,
    created_at      REAL NOT NULL,
    expires_at      REAL NOT NULL,
    browser_key     TEXT,
    used_at         REAL,
    job_id          INTEGER REFERENCES jobs(id)
);
