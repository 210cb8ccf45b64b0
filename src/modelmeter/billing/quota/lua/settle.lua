-- Settle (after prelude). ARGV: ttl, id, actual x6 (3-8). Idempotent: 0 when the hold is gone.
if not settle_hold(ARGV[2]) then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = 1, N do incr(C[i], ARGV[2 + i], '') end
end
touch()
return 1
