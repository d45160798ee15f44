-- The rolling window of one limit scope, compact and exact (prepended, after the prelude, to the
-- scripts that read or write one: admit, apply, release, usage).
--
-- Layout. The window is one hash, `<p>:{portfolio}:w<scope>`, whose values are packed with
-- Lua's `struct` (big-endian). Every contact is kept twice, both times exactly (us):
--
--   '#'      header: n = contacts in the time log, m = entries in the buckets, head and tail
--            = first and last chunk ids, level and split = the linear-hashing state of the
--            buckets, sweep = the next bucket to clean, trimmed = the highest window start
--            contacts were dropped up to, last = the last score written, oldest = the log's
--            first score, legacy = 1 while a legacy set may exist (TGW_HEADER_FORMAT)
--   'b<id>'  bucket: recipients whose hash falls in it (linear hashing on the first 4 bytes of
--            the hash), as <base: 7 bytes> then, per recipient, <hash: 8 bytes><score - base:
--            5 bytes>, in score order. A bucket holds at most `bucket_span` us between its base
--            and its newest score; it is rebased (its oldest live score becomes the base) when a
--            new score would not fit. Entries at or below `trimmed` have left the window and are
--            cleaned lazily (they form a prefix, since scores only grow).
--   'c<id>'  chunk of the time log: live scores in order, as <base: 7 bytes> then <score -
--            base: 5 bytes> each; at most `chunk` scores, within `chunk_span` us of the base.
--            Chunks head..tail hold every live contact, oldest first; a chunk emptied in the
--            middle stays (base only) until it reaches the head.
--   'd<p>'   directory page p: for each chunk 128p+1 .. 128p+128, its base (7 bytes) and how
--            many live contacts it holds (2 bytes; the tail's is its length, and counted here
--            only once the tail is full, so appending touches no page)
--   'D'      for each directory page from the head's on, its first base (7 bytes) and how many
--            live contacts its chunks hold (4 bytes, the tail's not included)
--            So the chunk of a score is two binary searches, and the contact at a rank two
--            walks, in two short fields.
--
-- So a recipient costs 13 bytes in its bucket and 5 in the log, plus each field's share of Redis'
-- own overhead (tens of bytes over dozens of entries). Buckets split when they average more than
-- `load` entries and merge back below a quarter of it, one at a time, so a scope's buckets follow
-- its size and no operation reads more than a bucket, two chunks and a directory page.
--
-- The count is `n` (plus what the legacy set still holds), corrected as the log's head is
-- trimmed; the oldest contact is `oldest`; the contact at rank r is found by walking the counts
-- of the directory's top (pages) and of one page (chunks). Nothing here rounds a time.
--
-- Migration: a sorted set found at the window's key is the layout before this one (member =
-- recipient hash, score = last contact). It is renamed to the legacy key `<p>:{portfolio}:wz<scope>`
-- and read beside the log until its contacts leave the window: all of them are older than every
-- score written since (scores only grow), so the two together are one ordered window. A contact
-- written again moves out of the legacy set. A hash is kept at the window's key for as long as the
-- legacy set lives, so a sidecar of the previous version fails on it (WRONGTYPE) instead of
-- counting beside it.

local TGW_HEADER = '#'
local TGW_HEADER_FORMAT = '>I5I5I5I5I1I5I5I7I7I7I1'
local TGW_TOP = 'D'
local TGW_TOP_ENTRY = 11
local TGW_PAGE = 128
local TGW_PAGE_ENTRY = 9
local TGW_BASE = 7
local TGW_ENTRY = MEMBER_LEN + 5
local TGW_STEP = 5

local TgWindow = {}
TgWindow.__index = TgWindow

local function tgw_bucket(id)
  return 'b' .. tg_fmt(id)
end

local function tgw_chunk(id)
  return 'c' .. tg_fmt(id)
end

-- The directory page of chunk `id` (ids start at 1), and the page's field.
local function tgw_page_of(id)
  return math.floor((id - 1) / TGW_PAGE)
end

local function tgw_page(p)
  return 'd' .. tg_fmt(p)
end

-- The index (0-based) of the last entry (`stride` bytes, starting with a 7-byte base) in `packed`
-- whose base is not above `score` (0: none is).
local function tgw_last_at_most(packed, stride, score)
  local lo, hi = 0, #packed / stride - 1
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if struct.unpack('>I7', packed, 1 + stride * mid) <= score then
      lo = mid
    else
      hi = mid - 1
    end
  end
  return lo
end

local function tgw_base(value)
  return (struct.unpack('>I7', value))
end

-- The offset of entry i (0-based) of a bucket or chunk.
local function tgw_bucket_offset(value, i)
  return (struct.unpack('>I5', value, TGW_BASE + 1 + TGW_ENTRY * i + MEMBER_LEN))
end

local function tgw_chunk_offset(value, i)
  return (struct.unpack('>I5', value, TGW_BASE + 1 + TGW_STEP * i))
end

-- Opens the window at `key` (legacy sorted set at `legacy`) as of `now`. `layout` ({load, chunk,
-- chunk_span, bucket_span}) is needed only by calls that write contacts.
-- The first entry of a score-ordered chunk or bucket `value` still in the window, given that
-- entry `lo` has left (its score <= `trimmed`) and entry `hi` has not (or is one past the last).
local function tgw_first_kept(value, lo, hi, offset, trimmed)
  local base = tgw_base(value)
  while hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    if base + offset(value, mid) <= trimmed then
      lo = mid
    else
      hi = mid
    end
  end
  return hi
end

local function tg_window(key, legacy, now, window, layout)
  local w = setmetatable({key = key, legacy = legacy, now = now, window = window, layout = layout,
    values = {}, dirty = {}, wrote = false}, TgWindow)
  local header = redis.pcall('HGET', key, TGW_HEADER)
  if type(header) == 'table' and header['err'] then
    if redis.call('TYPE', key)['ok'] ~= 'zset' then
      redis.call('HGET', key, TGW_HEADER) -- fails as it did
    end
    w:adopt()
    header = false
  end
  w.exists = header ~= false
  local has_legacy = 1
  if header then
    w.n, w.m, w.head, w.tail, w.level, w.split, w.sweep, w.trimmed, w.last, w.oldest, has_legacy =
      struct.unpack(TGW_HEADER_FORMAT, header)
  else
    w.n, w.m, w.head, w.tail, w.level, w.split, w.sweep, w.trimmed, w.last, w.oldest = 0, 0, 1, 0, 0, 0, 0, 0, 0, 0
  end
  -- Only an adoption makes a legacy set, and the header says whether one may still live.
  w.legacy_n = 0
  if has_legacy == 1 then
    w.legacy_n = redis.call('ZCARD', legacy)
  end
  return w
end

-- Moves a sorted set of the previous layout out of the way, into the legacy set.
function TgWindow:adopt()
  if redis.call('EXISTS', self.legacy) == 1 then
    -- A sidecar of the previous version started a new set after an earlier adoption.
    local ttl = math.max(redis.call('PTTL', self.legacy), redis.call('PTTL', self.key))
    redis.call('ZUNIONSTORE', self.legacy, 2, self.legacy, self.key, 'AGGREGATE', 'MAX')
    redis.call('DEL', self.key)
    if ttl > 0 then
      redis.call('PEXPIRE', self.legacy, ttl)
    end
  else
    redis.call('RENAME', self.key, self.legacy)
  end
end

-- A field's value (false when absent), read once per call.
function TgWindow:get(field)
  local v = self.values[field]
  if v == nil then
    v = redis.call('HGET', self.key, field)
    self.values[field] = v
  end
  return v
end

-- Sets a field's value (false: deletes it) when the call ends (`flush`).
function TgWindow:put(field, value)
  self.values[field] = value
  self.dirty[field] = true
end

-- Recipients counted in the window.
function TgWindow:count()
  return self.legacy_n + self.n
end

-- Drops the contacts that have left the window at `now`.
function TgWindow:trim()
  local start = self.now - self.window
  if start > self.trimmed then
    self.trimmed = start
  end
  if self.legacy_n > 0 then
    redis.call('ZREMRANGEBYSCORE', self.legacy, '-inf', tg_fmt(self.trimmed))
    self.legacy_n = redis.call('ZCARD', self.legacy)
  end
  while self.n > 0 and self.oldest <= self.trimmed do
    local name = tgw_chunk(self.head)
    local c = self:get(name)
    local count = (#c - TGW_BASE) / TGW_STEP
    local base = tgw_base(c)
    if base + tgw_chunk_offset(c, count - 1) <= self.trimmed then
      self.n = self.n - count
      self:tally(self.head, -count)
      self:put(name, string.sub(c, 1, TGW_BASE))
    else
      -- The first entry has left and the last has not: find the first that has not.
      local hi = tgw_first_kept(c, 0, count - 1, tgw_chunk_offset, self.trimmed)
      self.n = self.n - hi
      self:tally(self.head, -hi)
      self:put(name, string.sub(c, 1, TGW_BASE) .. string.sub(c, TGW_BASE + 1 + TGW_STEP * hi))
    end
    self:settle()
  end
end

-- Drops empty chunks at the head, so the head chunk holds the oldest contact, and notes it.
function TgWindow:settle()
  while self.head <= self.tail do
    local name = tgw_chunk(self.head)
    local c = self:get(name)
    if c and #c > TGW_BASE then
      self.oldest = tgw_base(c) + tgw_chunk_offset(c, 0)
      return
    end
    self:put(name, false)
    self.head = self.head + 1
    if tgw_page_of(self.head) > tgw_page_of(self.head - 1) then
      -- The head left a directory page: it goes, with its entry in the top page.
      self:put(tgw_page(tgw_page_of(self.head - 1)), false)
      local top = string.sub(self:get(TGW_TOP), TGW_TOP_ENTRY + 1)
      self:put(TGW_TOP, #top > 0 and top)
    end
  end
  self.oldest = 0
end

-- Adds `delta` to the live contacts of chunk `id`, in its directory page and in the top (not
-- for the tail, whose count is its length).
function TgWindow:tally(id, delta)
  if id == self.tail then
    return
  end
  local p = tgw_page_of(id)
  local name = tgw_page(p)
  local page = self:get(name)
  local at = 1 + TGW_PAGE_ENTRY * ((id - 1) % TGW_PAGE) + TGW_BASE
  local count = struct.unpack('>I2', page, at) + delta
  self:put(name, string.sub(page, 1, at - 1) .. struct.pack('>I2', count) .. string.sub(page, at + 2))
  local top = self:get(TGW_TOP)
  at = 1 + TGW_TOP_ENTRY * (p - tgw_page_of(self.head)) + TGW_BASE
  local total = struct.unpack('>I4', top, at) + delta
  self:put(TGW_TOP, string.sub(top, 1, at - 1) .. struct.pack('>I4', total) .. string.sub(top, at + 4))
end

-- The score of the contact at rank `r` (0 = the oldest), or nil: the legacy set's contacts come
-- first; then the log's, found by the live counts of the directory's pages, then of one page's
-- chunks.
function TgWindow:nth(r)
  if r < self.legacy_n then
    local e = redis.call('ZRANGE', self.legacy, r, r, 'WITHSCORES')
    return e[2] and tonumber(e[2])
  end
  r = r - self.legacy_n
  if r >= self.n then
    return nil
  end
  local tail = self:get(tgw_chunk(self.tail))
  local before_tail = self.n - (#tail - TGW_BASE) / TGW_STEP
  if r >= before_tail then
    return tgw_base(tail) + tgw_chunk_offset(tail, r - before_tail)
  end
  local top = self:get(TGW_TOP)
  for k = 0, #top / TGW_TOP_ENTRY - 1 do
    local total = struct.unpack('>I4', top, 1 + TGW_TOP_ENTRY * k + TGW_BASE)
    if r < total then
      local p = tgw_page_of(self.head) + k
      local page = self:get(tgw_page(p))
      for i = 0, #page / TGW_PAGE_ENTRY - 1 do
        local count = struct.unpack('>I2', page, 1 + TGW_PAGE_ENTRY * i + TGW_BASE)
        if r < count then
          local c = self:get(tgw_chunk(p * TGW_PAGE + 1 + i))
          return tgw_base(c) + tgw_chunk_offset(c, r)
        end
        r = r - count
      end
    end
    r = r - total
  end
  return nil
end

-- The oldest contact's score, or nil.
function TgWindow:first()
  if self.legacy_n > 0 then
    return self:nth(0)
  end
  return self.n > 0 and self.oldest or nil
end

-- When the oldest contact leaves the window (0: nothing counted), as Usage.next_slot_at reports.
function TgWindow:next_slot()
  local oldest = self:first()
  return oldest and oldest + self.window or 0
end

-- The bucket a recipient hash falls in (linear hashing).
function TgWindow:bucket_of(member)
  local h = struct.unpack('>I4', member)
  local size = 2 ^ self.level
  local id = h % size
  if id < self.split then
    id = h % (size * 2)
  end
  return id
end

-- The recipient's bucket: its id, its value (false when absent), and the recipient's entry in
-- it, if any: position and score (live or not).
function TgWindow:lookup(member)
  local id = self:bucket_of(member)
  local b = self:get(tgw_bucket(id))
  if b then
    local from = TGW_BASE + 1
    while true do
      local at = string.find(b, member, from, true)
      if not at then
        break
      end
      if (at - TGW_BASE - 1) % TGW_ENTRY == 0 then
        local off = struct.unpack('>I5', b, at + MEMBER_LEN)
        return id, b, at, tgw_base(b) + off
      end
      from = at + 1
    end
  end
  return id, b, nil, nil
end

-- The score of the recipient's contact in the window, or nil. (Contacts are dropped by `trim`:
-- until then, one that has left the window still counts, as in every store.)
function TgWindow:contact(member)
  if #member ~= MEMBER_LEN then
    return nil
  end
  local _, _, at, score = self:lookup(member)
  if at and score > self.trimmed then
    return score
  end
  if self.legacy_n > 0 then
    local s = redis.call('ZSCORE', self.legacy, member)
    if s then
      return tonumber(s)
    end
  end
  return nil
end

-- A bucket without the entries that have left the window (a prefix: entries are in score order).
function TgWindow:clean(b)
  local count = (#b - TGW_BASE) / TGW_ENTRY
  local base = tgw_base(b)
  if count == 0 or base + tgw_bucket_offset(b, 0) > self.trimmed then
    return b
  end
  -- Entry 0 has left; hi is the first that has not (count: none).
  local hi = tgw_first_kept(b, 0, count, tgw_bucket_offset, self.trimmed)
  self.m = self.m - hi
  return string.sub(b, 1, TGW_BASE) .. string.sub(b, TGW_BASE + 1 + TGW_ENTRY * hi)
end

-- A bucket's entries as {hash, score} pairs, in order.
local function tgw_entries(b)
  local out = {}
  if not b then
    return out
  end
  local base = tgw_base(b)
  for at = TGW_BASE + 1, #b, TGW_ENTRY do
    out[#out + 1] = {string.sub(b, at, at + MEMBER_LEN - 1), base + struct.unpack('>I5', b, at + MEMBER_LEN)}
  end
  return out
end

-- A bucket of these entries (in order), based at the first one's score; false when empty.
function TgWindow:pack_bucket(entries)
  if #entries == 0 then
    return false
  end
  local base = entries[1][2]
  local parts = {struct.pack('>I7', base)}
  for i, e in ipairs(entries) do
    if e[2] - base >= self.layout.bucket_span then
      error('tiergate: contacts of one bucket span more than it can hold; is policy.window too long?')
    end
    parts[i + 1] = e[1] .. struct.pack('>I5', e[2] - base)
  end
  return table.concat(parts)
end

-- Adds `member` at `score` (newer than every score in the window) to bucket value `b`.
function TgWindow:bucket_add(b, member, score)
  if b then
    b = self:clean(b)
  end
  self.m = self.m + 1
  if not b or #b == TGW_BASE then
    return struct.pack('>I7', score) .. member .. struct.pack('>I5', 0)
  end
  local base = tgw_base(b)
  if score - base >= self.layout.bucket_span then
    local entries = tgw_entries(b)
    entries[#entries + 1] = {member, score}
    return self:pack_bucket(entries)
  end
  return b .. member .. struct.pack('>I5', score - base)
end

-- Appends a score (newer than every score in the log) to the log.
function TgWindow:log_append(score)
  -- The log is empty exactly when it has no chunk (`settle`).
  if self.head <= self.tail then
    local name = tgw_chunk(self.tail)
    local c = self:get(name)
    local base = tgw_base(c)
    local count = (#c - TGW_BASE) / TGW_STEP
    if count < self.layout.chunk and score - base < self.layout.chunk_span then
      self:put(name, c .. struct.pack('>I5', score - base))
      self.n = self.n + 1
      return
    end
    -- The tail is full: its count goes into the directory, and a new tail starts.
    self.tail = self.tail + 1
    self:tally(self.tail - 1, count)
  else
    self.oldest = score
    self.tail = self.tail + 1
  end
  self:put(tgw_chunk(self.tail), struct.pack('>I7I5', score, 0))
  self.n = self.n + 1
  -- Into the directory: a page holds consecutive chunk ids from its first, so a new page (and
  -- its entry in the top) starts exactly at the first id of a page.
  local page = tgw_page(tgw_page_of(self.tail))
  if (self.tail - 1) % TGW_PAGE == 0 then
    self:put(page, struct.pack('>I7I2', score, 0))
    self:put(TGW_TOP, (self:get(TGW_TOP) or '') .. struct.pack('>I7I4', score, 0))
  else
    self:put(page, self:get(page) .. struct.pack('>I7I2', score, 0))
  end
end

-- The id of the chunk that holds a live score: the last whose base is not above it. A recent
-- contact (one counted again soon, a quick Release) is in the tail, which needs no directory.
function TgWindow:chunk_of(score)
  if score >= tgw_base(self:get(tgw_chunk(self.tail))) then
    return self.tail
  end
  local p = tgw_page_of(self.head) + tgw_last_at_most(self:get(TGW_TOP), TGW_TOP_ENTRY, score)
  return p * TGW_PAGE + 1 + tgw_last_at_most(self:get(tgw_page(p)), TGW_PAGE_ENTRY, score)
end

-- Removes a live score from the log.
function TgWindow:log_remove(score)
  local id = self:chunk_of(score)
  local name = tgw_chunk(id)
  local c = self:get(name)
  local needle = struct.pack('>I5', score - tgw_base(c))
  local from = TGW_BASE + 1
  while true do
    local at = string.find(c, needle, from, true)
    if not at then
      error('tiergate: a contact of the window is missing from its time log')
    end
    if (at - TGW_BASE - 1) % TGW_STEP == 0 then
      self:put(name, string.sub(c, 1, at - 1) .. string.sub(c, at + TGW_STEP))
      self.n = self.n - 1
      self:tally(id, -1)
      if score == self.oldest then
        self:settle()
      end
      return
    end
    from = at + 1
  end
end

-- Removes the recipient's entry (at `at` in bucket `id`, value `b`) and its contact in the log.
function TgWindow:unlink(id, b, at, score)
  b = string.sub(b, 1, at - 1) .. string.sub(b, at + TGW_ENTRY)
  self.m = self.m - 1
  if score > self.trimmed then
    self:log_remove(score)
  end
  return b
end

-- Makes `score` (newer than every score in the window) the recipient's last contact.
function TgWindow:write(member, score)
  if #member ~= MEMBER_LEN then
    error('tiergate: a recipient hash must be ' .. MEMBER_LEN .. ' bytes')
  end
  local id, b, at, old = self:lookup(member)
  if at then
    b = self:unlink(id, b, at, old)
  end
  if self.legacy_n > 0 and redis.call('ZREM', self.legacy, member) == 1 then
    self.legacy_n = self.legacy_n - 1
  end
  self:put(tgw_bucket(id), self:bucket_add(b, member, score))
  self:log_append(score)
  self.last = score
  self.wrote = true
end

-- Removes the recipient's contact if it is counted (and, with `score`, only if it is that one);
-- returns whether it did.
function TgWindow:remove(member, score)
  if #member ~= MEMBER_LEN then
    return false
  end
  local id, b, at, old = self:lookup(member)
  if at and old > self.trimmed then
    if score and old ~= score then
      return false
    end
    b = self:unlink(id, b, at, old)
    self:put(tgw_bucket(id), #b > TGW_BASE and b)
    return true
  end
  if self.legacy_n > 0 then
    local s = redis.call('ZSCORE', self.legacy, member)
    if s and (not score or tonumber(s) == score) then
      redis.call('ZREM', self.legacy, member)
      self.legacy_n = self.legacy_n - 1
      return true
    end
  end
  return false
end

-- Buckets in use.
function TgWindow:buckets()
  return 2 ^ self.level + self.split
end

-- Splits the next bucket in two by the next bit of the hash.
function TgWindow:grow()
  local size = 2 ^ self.level
  local from = tgw_bucket(self.split)
  local b = self:get(from)
  if b then
    b = self:clean(b)
    local low, high = {string.sub(b, 1, TGW_BASE)}, {string.sub(b, 1, TGW_BASE)}
    for at = TGW_BASE + 1, #b, TGW_ENTRY do
      local e = string.sub(b, at, at + TGW_ENTRY - 1)
      local half = low
      if math.floor(struct.unpack('>I4', e) / size) % 2 == 1 then
        half = high
      end
      half[#half + 1] = e
    end
    self:put(from, #low > 1 and table.concat(low))
    self:put(tgw_bucket(self.split + size), #high > 1 and table.concat(high))
  end
  self.split = self.split + 1
  if self.split == size then
    self.level, self.split = self.level + 1, 0
  end
end

-- Merges the last bucket back into the one it was split from.
function TgWindow:shrink()
  if self.split == 0 then
    self.level = self.level - 1
    self.split = 2 ^ self.level
  end
  self.split = self.split - 1
  local into, from = tgw_bucket(self.split), tgw_bucket(self.split + 2 ^ self.level)
  local a, b = self:get(into), self:get(from)
  a, b = a and self:clean(a), b and self:clean(b)
  local x, y, merged = tgw_entries(a), tgw_entries(b), {}
  local i, j = 1, 1
  while i <= #x or j <= #y do
    if j > #y or (i <= #x and x[i][2] < y[j][2]) then
      merged[#merged + 1] = x[i]
      i = i + 1
    else
      merged[#merged + 1] = y[j]
      j = j + 1
    end
  end
  self:put(into, self:pack_bucket(merged))
  self:put(from, false)
end

-- Keeps buckets near `load` entries each, and cleans one bucket of entries that left the window.
function TgWindow:tidy()
  if self.n == 0 and self.legacy_n == 0 then
    return -- `flush` deletes the window
  end
  local load = self.layout.load
  while self.m > load * self:buckets() do
    self:grow()
  end
  while self:buckets() > 1 and self.m * 4 < load * self:buckets() do
    self:shrink()
  end
  if self.m > self.n then
    local id = self.sweep % self:buckets()
    local name = tgw_bucket(id)
    local b = self:get(name)
    if b then
      local cleaned = self:clean(b)
      if #cleaned ~= #b then
        self:put(name, #cleaned > TGW_BASE and cleaned)
      end
    end
    self.sweep = (id + 1) % self:buckets()
  end
end

-- Writes what the call changed. A window with no contact left is deleted whole, so entries that
-- left it go too; one that got a new contact lives until that contact leaves.
function TgWindow:flush()
  if self.n == 0 and self.legacy_n == 0 then
    if self.exists then
      redis.call('UNLINK', self.key)
    end
    return
  end
  local set, del = {}, {}
  for field in pairs(self.dirty) do
    local v = self.values[field]
    if v then
      set[#set + 1] = field
      set[#set + 1] = v
    else
      del[#del + 1] = field
    end
  end
  set[#set + 1] = TGW_HEADER
  set[#set + 1] = struct.pack(TGW_HEADER_FORMAT, self.n, self.m, self.head, self.tail, self.level, self.split,
    self.sweep, self.trimmed, self.last, self.oldest, self.legacy_n > 0 and 1 or 0)
  for i = 1, #set, 200 do
    redis.call('HSET', self.key, unpack(set, i, math.min(i + 199, #set)))
  end
  for i = 1, #del, 200 do
    redis.call('HDEL', self.key, unpack(del, i, math.min(i + 199, #del)))
  end
  if self.wrote then
    redis.call('PEXPIRE', self.key, tg_ttl_until(self.last + self.window, self.now))
  end
  if self.legacy_n > 0 then
    -- Kept at least as long as the legacy set (see the layout above).
    local ttl = redis.call('PTTL', self.legacy)
    if ttl > 0 and redis.call('PTTL', self.key) < ttl then
      redis.call('PEXPIRE', self.key, ttl)
    end
  end
end
