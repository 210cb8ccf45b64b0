-- Count usage that had no hold (after prelude), if the counters exist. ARGV: ttl, amount x6 (2-7).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, N do incr(C[i], ARGV[1 + i], '') end
touch()
return 1
