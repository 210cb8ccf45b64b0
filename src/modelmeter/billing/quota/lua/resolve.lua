-- Resolve parked draws (lapse_hold's). KEYS: the tenant's credits hash. ARGV: reservation id, then '1' (served:
-- keep the draw) or '0' (return it to its grants), repeated.
for i = 1, #ARGV, 2 do
  local drawn = redis.call('HGET', KEYS[1], 'x:' .. ARGV[i])
  if drawn then
    redis.call('HDEL', KEYS[1], 'x:' .. ARGV[i])
    if ARGV[i + 1] == '0' then
      for grant, digits in string.gmatch(drawn, '(%S+) (%d+)') do
        if redis.call('HEXISTS', KEYS[1], 'm:' .. grant) == 1 then
          redis.call('HINCRBY', KEYS[1], 'r:' .. grant, digits)
        end
      end
    end
  end
end
return 1
