//! A small incremental parser for server-sent events (the `text/event-stream`
//! format both model APIs stream in).
//!
//! Bytes go in as they arrive from the network, in pieces of any size; whole
//! events come out. Follows the WHATWG rules the model APIs rely on: lines end
//! in `\n`, `\r\n` or `\r`; `event:` names the event; several `data:` lines
//! are joined with `\n`; a blank line dispatches; lines starting with `:` are
//! comments; `id:` and `retry:` are ignored (the clients never reconnect to a
//! stream, they re-send the request).

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, if the event had one.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Parser state between network reads.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of a line not yet terminated.
    partial: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &byte in bytes {
            if self.after_cr {
                self.after_cr = false;
                if byte == b'\n' {
                    continue;
                }
            }
            match byte {
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.partial);
                    if let Some(event) = self.line(&line) {
                        events.push(event);
                    }
                }
                _ => self.partial.push(byte),
            }
        }
        events
    }

    /// Ends the stream: an event whose blank line never came is dispatched
    /// if it has data (some servers close right after the last `data:` line).
    pub fn finish(&mut self) -> Option<SseEvent> {
        let line = std::mem::take(&mut self.partial);
        if !line.is_empty()
            && let Some(event) = self.line(&line)
        {
            return Some(event);
        }
        self.dispatch()
    }

    fn line(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.first() == Some(&b':') {
            return None;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (text.as_ref(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        let data = self.data.take()?;
        Some(SseEvent { event, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: name.map(str::to_owned),
            data: data.to_owned(),
        }
    }

    #[test]
    fn events_split_across_reads_at_any_byte_come_out_whole() {
        let stream =
            "event: message_start\ndata: {\"a\":1}\n\n: keep-alive\n\ndata: x\ndata: y\n\n";
        let expected = vec![
            event(Some("message_start"), "{\"a\":1}"),
            event(None, "x\ny"),
        ];
        for split in 0..stream.len() {
            let mut parser = SseParser::new();
            let mut events = parser.feed(&stream.as_bytes()[..split]);
            events.extend(parser.feed(&stream.as_bytes()[split..]));
            assert_eq!(events, expected, "split at {split}");
        }
    }

    #[test]
    fn crlf_and_cr_line_endings_work_even_when_split_between_reads() {
        let mut parser = SseParser::new();
        let mut events = parser.feed(b"data: one\r");
        events.extend(parser.feed(b"\n\r\ndata:two\r\r"));
        assert_eq!(events, [event(None, "one"), event(None, "two")]);
    }

    #[test]
    fn an_event_without_its_blank_line_is_dispatched_at_the_end() {
        let mut parser = SseParser::new();
        assert_eq!(parser.feed(b"data: [DONE]"), []);
        assert_eq!(parser.finish(), Some(event(None, "[DONE]")));
        assert_eq!(parser.finish(), None);
    }

    #[test]
    fn a_blank_line_without_data_dispatches_nothing() {
        let mut parser = SseParser::new();
        assert_eq!(parser.feed(b"event: ping\n\n\n"), []);
    }
}
