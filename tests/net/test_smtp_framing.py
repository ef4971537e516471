"""appliance.net.framing: CRLF-only lines with bounded memory, DATA assembly."""

from appliance.net.framing import DataBody, Line, LineFramer


def lines(framer, limit=512):
    out = []
    while (line := framer.next_line(limit)) is not None:
        out.append(line)
    return out


def test_only_crlf_ends_a_line():
    framer = LineFramer()
    framer.feed(b"one\r\ntwo\nstill two\rand more\r\nthree")
    assert lines(framer) == [Line(b"one", 3, False, False),
                             Line(b"two\nstill two\rand more", 22, False, True)]
    assert framer.buffered == len(b"three")


def test_crlf_split_across_reads():
    framer = LineFramer()
    framer.feed(b"abc\r")
    assert framer.next_line(512) is None
    framer.feed(b"\ndef\r\n")
    assert [line.data for line in lines(framer)] == [b"abc", b"def"]


def test_line_at_the_limit_is_fine_one_more_octet_is_not():
    framer = LineFramer()
    framer.feed(b"x" * 510 + b"\r\n" + b"y" * 511 + b"\r\n")
    first, second = lines(framer)
    assert not first.too_long and first.data == b"x" * 510
    assert second.too_long and second.length == 511 and second.data == b""


def test_endless_line_keeps_the_buffer_bounded():
    """T7: a stream without CRLF is discarded as it comes, not buffered."""
    framer = LineFramer()
    for _ in range(1000):
        framer.feed(b"z" * 1024)
        assert framer.next_line(512) is None
        assert framer.buffered <= 512
    assert framer.overflowing and framer.discarded >= 1000 * 1024 - 512
    framer.feed(b"tail\r\nnext\r\n")
    long_line, following = lines(framer)
    assert long_line.too_long and long_line.length == 1000 * 1024 + 4
    assert following == Line(b"next", 4, False, False)
    assert not framer.overflowing


def test_bare_lf_in_the_discarded_part_is_still_reported():
    framer = LineFramer()
    framer.feed(b"a" * 600 + b"\n" + b"b" * 600)
    assert framer.next_line(512) is None
    framer.feed(b"\r\n")
    (line,) = lines(framer)
    assert line.too_long and line.bare


def test_trailing_cr_is_kept_while_discarding():
    framer = LineFramer()
    framer.feed(b"a" * 2000 + b"\r")
    assert framer.next_line(1000) is None and framer.buffered == 1
    framer.feed(b"\n")
    (line,) = lines(framer, 1000)
    assert line.too_long and not line.bare


def feed_body(body, text, limit=1000):
    framer = LineFramer()
    framer.feed(text)
    for line in lines(framer, limit):
        if body.add(line):
            return True
    return False


def test_data_body_unstuffs_and_ends_at_the_lone_dot():
    body = DataBody(max_size=1000)
    assert feed_body(body, b"Subject: x\r\n\r\n..leading dot\r\n.\r\n")
    assert body.message() == b"Subject: x\r\n\r\n.leading dot\r\n"
    assert body.fault is None
    assert body.size == len(b"Subject: x\r\n\r\n.leading dot\r\n")


def test_data_body_empty_message():
    body = DataBody(max_size=1000)
    assert feed_body(body, b".\r\n")
    assert body.message() == b"" and body.fault is None


def test_data_body_over_size_stops_keeping_lines():
    body = DataBody(max_size=100)
    assert feed_body(body, b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\nz\r\n.\r\n")
    assert body.fault == "too_big" and body.message() == b""
    assert body.size == 62 + 62 + 3


def test_data_body_faults_in_order_of_gravity():
    body = DataBody(max_size=10)
    assert feed_body(body, b"a" * 1200 + b"\r\nbare\nlf\r\n.\r\n")
    assert body.fault == "bare_cr_lf"
    body = DataBody(max_size=10)
    assert feed_body(body, b"a" * 1200 + b"\r\n.\r\n")
    assert body.fault == "long_line"


def test_a_dot_after_a_discarded_long_line_does_not_end_data():
    """T8: the tail of an over-long line must not be taken for the final dot."""
    body = DataBody(max_size=10_000)
    framer = LineFramer()
    framer.feed(b"a" * 1500)
    assert framer.next_line(1000) is None
    framer.feed(b".\r\nmore\r\n")
    first, second = lines(framer, 1000)
    assert not body.add(first) and not body.add(second)
    assert body.fault == "long_line"


def line_by_line(chunks, max_size, limit=1000):
    """DATA the reference way: next_line + DataBody.add, one line at a time."""
    framer, body = LineFramer(), DataBody(max_size)
    for i, chunk in enumerate(chunks):
        framer.feed(chunk)
        while (line := framer.next_line(limit)) is not None:
            if body.add(line):
                return body, bytes(framer._buffer) + b"".join(chunks[i + 1:])
    return body, None


def in_blocks(chunks, max_size, limit=1000):
    """DATA the fast way, as ApplianceSMTP._drain does it."""
    framer, body = LineFramer(), DataBody(max_size)
    for i, chunk in enumerate(chunks):
        framer.feed(chunk)
        while True:
            done = framer.take_body(body, limit)
            if done is False:
                break
            line = Line(b".", 1, False, False) if done else framer.next_line(limit)
            if line is None:
                break
            if body.add(line):
                return body, bytes(framer._buffer) + b"".join(chunks[i + 1:])
    return body, None


BODIES = [
    b".\r\nQUIT\r\n",
    b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n",
    b"..leading dot\r\n.\r\n",
    b"a\r\n..\r\n...\r\n.x\r\nb\r\n.\r\nMAIL FROM:<a@b>\r\n",
    b"line\r\n" * 300 + b".\r\n",
    b"long " + b"y" * 1200 + b"\r\nafter\r\n.\r\n",
    b"bare\nlf\r\n.\r\n",
    b"bare\rcr\r\nmore\r\n.\r\n",
    b"smuggle\r\n.\nMAIL FROM:<x@y>\r\n.\r\n",
    b"smuggle\n.\r\nRCPT TO:<x@y>\r\n.\r\n",
    b"x" * 998 + b"\r\n" + b"z" * 999 + b"\r\n.\r\n",
    b"big " * 200 + b"\r\n.\r\n",
    b"no end yet\r\npartial",
]


def test_taking_the_body_in_blocks_is_the_same_as_line_by_line():
    """Every body, cut into reads at every boundary size: same message, size,
    fault and leftover input (the pipelined commands after the dot)."""
    for data in BODIES:
        for step in (1, 2, 3, 7, 64, 1000, len(data)):
            chunks = [data[i:i + step] for i in range(0, len(data), step)]
            for max_size in (10_000, 500):
                slow, slow_rest = line_by_line(chunks, max_size)
                fast, fast_rest = in_blocks(chunks, max_size)
                assert (fast.message(), fast.size, fast.fault, fast_rest) == \
                    (slow.message(), slow.size, slow.fault, slow_rest), (data[:40], step)


def test_a_plain_body_is_taken_whole():
    framer, body = LineFramer(), DataBody(10_000)
    framer.feed(b"Subject: x\r\n\r\n..dot\r\nend\r\n.\r\nQUIT\r\n")
    assert framer.take_body(body, 1000) is True
    assert body.message() == b"Subject: x\r\n\r\n.dot\r\nend\r\n"
    assert bytes(framer._buffer) == b"QUIT\r\n" and not body.slow


def test_an_odd_line_sends_the_rest_of_the_message_line_by_line():
    framer, body = LineFramer(), DataBody(10_000)
    framer.feed(b"ok\r\nbare\nlf\r\n")
    assert framer.take_body(body, 1000) is None and body.slow
    framer.feed(b"fine\r\n.\r\n")
    assert framer.take_body(body, 1000) is None     # stays on the careful path
