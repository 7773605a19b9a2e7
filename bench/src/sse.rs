//! A reader of the coordinator's live log tail (`text/event-stream`): splits
//! the byte stream into events, whatever the network's chunking.

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// Gathers bytes and hands out the complete events among them.
#[derive(Default)]
pub struct Parser {
    buffer: Vec<u8>,
}

impl Parser {
    /// Adds bytes as they came off the wire.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete event, if one has arrived. Comments (keep-alives)
    /// and events without data are skipped.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            let end = self.buffer.windows(2).position(|w| w == b"\n\n")?;
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            let mut event = Event {
                id: None,
                event: "message".into(),
                data: String::new(),
            };
            for line in block.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => event.id = Some(value.to_owned()),
                    "event" => event.event = value.to_owned(),
                    "data" => {
                        if !event.data.is_empty() {
                            event.data.push('\n');
                        }
                        event.data.push_str(value);
                    }
                    _ => {} // a comment (empty field) or a field we do not use
                }
            }
            if !event.data.is_empty() {
                return Some(event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_found_across_arbitrary_splits() {
        let wire = b": keep-alive\n\nid: 1\nevent: log\ndata: {\"seq\":1}\n\nevent: end\ndata: {\"status\":\"succeeded\"}\n\n";
        for split in 0..wire.len() {
            let mut parser = Parser::default();
            let mut events = Vec::new();
            parser.push(&wire[..split]);
            events.extend(std::iter::from_fn(|| parser.next_event()));
            parser.push(&wire[split..]);
            events.extend(std::iter::from_fn(|| parser.next_event()));
            assert_eq!(
                events,
                vec![
                    Event {
                        id: Some("1".into()),
                        event: "log".into(),
                        data: "{\"seq\":1}".into()
                    },
                    Event {
                        id: None,
                        event: "end".into(),
                        data: "{\"status\":\"succeeded\"}".into()
                    },
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn an_incomplete_event_waits_for_its_end() {
        let mut parser = Parser::default();
        parser.push(b"event: log\ndata: x\n");
        assert_eq!(parser.next_event(), None);
        parser.push(b"\n");
        assert_eq!(parser.next_event().map(|e| e.data), Some("x".into()));
    }
}
