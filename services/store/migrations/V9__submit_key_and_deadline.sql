-- Safe submits and deadlines. `submit_key` is recorded before a job's request is sent to the backend (and sent
-- with it as its Idempotency-Key): a job found queued with a key after a restart may already be at the backend,
-- and is sent again only with the same key, which a backend that honours keys answers with the request it has.
-- `deadline_at` is when the job must have finished at the backend, fixed when it first leaves the bot's queue, so
-- a restart doesn't give it a new allowance.
ALTER TABLE jobs ADD COLUMN submit_key TEXT;
ALTER TABLE jobs ADD COLUMN deadline_at REAL;
