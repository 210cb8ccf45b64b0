-- Mirrors modelmeter.billing.pricing.metered_cost_micro: change both together. The usage cost of ``used``
-- (``Amount.values()`` order: requests, tokens, training tokens, cost, batch requests, batch tokens) given
-- ``prices`` (the batch discount percent, then for each dimension in turn: {included, volume,
-- tiers = {{up_to, unit, flat}, ...}}; a flat price is one unbounded graduated tier without flat amount;
-- ``read_prices`` reads the text that quota/redis.py's ``_price_args`` writes). Batch units come after the
-- interactive ones and their share of the cost is discounted: C(own) + (C(all) - C(own)) * (100 - d) / 100. Graduated: each tier prices the
-- units in (previous up_to, up_to] plus its flat amount once reached; volume: every unit at the price of the tier
-- the total falls in plus that tier's flat amount; the first tier is reached at 0 billable units, and an unused
-- dimension costs nothing. Lua numbers are doubles: exact below 2^53 micro-cents (about 90 million dollars), as
-- are the totals the reserve script compares.
local function read_prices(text)
  local words = {}
  for word in string.gmatch(text, '%S+') do words[#words + 1] = word end
  local prices, at = {discount = tonumber(words[1])}, 2
  for d = 1, 3 do
    local price = {included = tonumber(words[at]), volume = words[at + 1] == 'v', tiers = {}}
    local count = tonumber(words[at + 2])
    at = at + 3
    for k = 1, count do
      local up_to = words[at] == '-' and math.huge or tonumber(words[at])
      price.tiers[k] = {up_to, tonumber(words[at + 1]), tonumber(words[at + 2])}
      at = at + 3
    end
    prices[d] = price
  end
  return prices
end
local function dimension_cost(used, price)
  if used == 0 then return 0 end
  local billable = math.max(0, used - price.included)
  local tiers = price.tiers
  if price.volume then
    for k = 1, #tiers do
      local tier = tiers[k]
      if billable <= tier[1] then return billable * tier[2] + tier[3] end
    end
  end
  local cost, lower = 0, 0
  for k = 1, #tiers do
    local tier = tiers[k]
    if k > 1 and billable <= lower then break end
    cost = cost + (math.min(billable, tier[1]) - lower) * tier[2] + tier[3]
    lower = tier[1]
  end
  return cost
end
local function usage_cost(used, prices)
  local cost = dimension_cost(used[3], prices[3])
  for i = 1, 2 do
    local whole = dimension_cost(used[i], prices[i])
    local batch = used[4 + i] or 0
    local keep = 100 - prices.discount
    if batch > 0 and keep < 100 then
      local own = dimension_cost(used[i] - batch, prices[i])
      -- The plan's discounted prices are whole micro-cents, so (whole - own) * keep divides by 100; it is taken
      -- apart (q * 100 + r) so that no product leaves the doubles' exact range below 2^53.
      local diff = whole - own
      local q = math.floor(diff / 100)
      local r = diff - q * 100
      cost = cost + own + q * keep + r * keep / 100
    else
      cost = cost + whole
    end
  end
  return cost
end
