-- Release (after prelude). ARGV: ttl, id. Idempotent: 0 when the hold is gone.
if not release_hold(ARGV[2]) then return 0 end
touch()
return 1
