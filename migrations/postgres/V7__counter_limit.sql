-- Version 7: the limit a hard window is judged by once it has ended. While the window is open
-- it is raised to the highest limit in effect at each write; a window first written after it
-- ended keeps the limit in effect at that first write. A later upgrade or downgrade does not
-- judge a past window by a plan it never ran under.
ALTER TABLE counters ADD COLUMN IF NOT EXISTS lim bigint;
