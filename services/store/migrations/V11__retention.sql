-- Retention (services/retention.py): a finished job's pictures, result and event history are deleted after the
-- days the operator sets; the job row stays (its options, status, error, cost), recording when each went, so a
-- button on an old result can say the pictures were deleted and after how long.
ALTER TABLE jobs ADD COLUMN inputs_deleted_at REAL;
ALTER TABLE jobs ADD COLUMN results_deleted_at REAL;
ALTER TABLE jobs ADD COLUMN events_deleted_at REAL;
-- What the cleanup looks for: finished jobs still holding each kind of data. A swept job leaves the index, so
-- these stay the size of the retention window, not of the history.
CREATE INDEX jobs_inputs_kept ON jobs(finished_at) WHERE inputs_deleted_at IS NULL;
CREATE INDEX jobs_results_kept ON jobs(finished_at) WHERE results_deleted_at IS NULL;
CREATE INDEX jobs_events_kept ON jobs(finished_at) WHERE events_deleted_at IS NULL;

-- Quotas (services/store/usage.py) count from these indexes alone, never reading a job's row: a server's jobs
-- since the start of the day (who, counted or not, cost), and a user's latest counted job. They replace
-- jobs_guild and jobs_guild_user, which are their prefixes.
DROP INDEX jobs_guild;
DROP INDEX jobs_guild_user;
CREATE INDEX jobs_guild_usage ON jobs(guild_id, created_at, user_id, status, attempts, cost);
CREATE INDEX jobs_guild_user_usage ON jobs(guild_id, user_id, created_at, status, attempts);

-- Start-up: results never posted (the bot stopped in between), without reading every succeeded job.
CREATE INDEX jobs_unposted ON jobs(id)
    WHERE status = 'succeeded' AND result_message_id IS NULL AND channel_id IS NOT NULL;

-- Collecting blobs nothing refers to any more, and deleting a blob (its foreign keys are checked against each of
-- these): one index per column that refers to a blob.
CREATE INDEX job_blobs_sha256 ON job_blobs(sha256);
CREATE INDEX painter_sessions_image ON painter_sessions(image_sha256);
CREATE INDEX drafts_image ON drafts(image_sha256);
CREATE INDEX drafts_mask ON drafts(mask_sha256);

-- Everything else the cleanup deletes by age.
CREATE INDEX painter_sessions_expires ON painter_sessions(expires_at);
CREATE INDEX drafts_created ON drafts(created_at);
CREATE INDEX moderation_log_created ON moderation_log(created_at);
CREATE INDEX upload_checks_checked ON upload_checks(checked_at);
