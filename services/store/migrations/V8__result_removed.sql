-- A job's result taken out of the channel (its message deleted, or its part of a message showing several jobs'
-- results removed). The job keeps result_message_id, so it is never posted again on a restart; this says the
-- result is gone, and which jobs a shared message still shows.
ALTER TABLE jobs ADD COLUMN result_removed_at REAL;
