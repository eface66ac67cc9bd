//! Turns protocol-level pieces into [`ProviderEvent`]s and the collected answer. Both wire
//! protocols feed this, so reassembly and malformed-JSON detection are the same for both.

use super::{ProviderEvent, StopReason, ToolCall, Usage};

/// Most tool calls accepted in one answer.
pub const MAX_TOOL_CALLS: usize = 256;

struct Partial {
    /// The protocol's index for the call (content block index / tool_calls index).
    index: u64,
    id: String,
    name: String,
    args: String,
    done: bool,
}

/// The parts of a finished answer.
#[derive(Debug)]
pub struct Collected {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub stop_reason: StopReason,
    pub usage: Usage,
}

pub struct Collector<'s> {
    sink: &'s mut (dyn FnMut(ProviderEvent) + Send),
    text: String,
    calls: Vec<Partial>,
    done_calls: Vec<ToolCall>,
    usage: Usage,
    stop: Option<StopReason>,
}

impl<'s> Collector<'s> {
    pub fn new(sink: &'s mut (dyn FnMut(ProviderEvent) + Send)) -> Self {
        Self {
            sink,
            text: String::new(),
            calls: Vec::new(),
            done_calls: Vec::new(),
            usage: Usage::default(),
            stop: None,
        }
    }

    pub fn text(&mut self, s: &str) {
        if !s.is_empty() {
            self.text.push_str(s);
            (self.sink)(ProviderEvent::TextDelta(s.to_string()));
        }
    }

    /// A call seen for the first time; `id` is generated when the server sent none.
    pub fn call_start(&mut self, index: u64, id: Option<&str>, name: &str) -> Result<(), String> {
        if self.calls.iter().any(|c| c.index == index) {
            return Err(format!("tool call {index} started twice"));
        }
        if self.calls.len() >= MAX_TOOL_CALLS {
            return Err(format!(
                "more than {MAX_TOOL_CALLS} tool calls in one answer"
            ));
        }
        let id = match id {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => format!("call_{index}"),
        };
        self.calls.push(Partial {
            index,
            id: id.clone(),
            name: name.to_string(),
            args: String::new(),
            done: false,
        });
        (self.sink)(ProviderEvent::ToolCallStart {
            id,
            name: name.to_string(),
        });
        Ok(())
    }

    pub fn has_call(&self, index: u64) -> bool {
        self.calls.iter().any(|c| c.index == index)
    }

    /// More of a call's name (OpenAI servers may split it).
    pub fn call_name(&mut self, index: u64, more: &str) {
        if let Some(c) = self.calls.iter_mut().find(|c| c.index == index && !c.done) {
            c.name.push_str(more);
        }
    }

    pub fn call_delta(&mut self, index: u64, fragment: &str) -> Result<(), String> {
        let c = self
            .calls
            .iter_mut()
            .find(|c| c.index == index)
            .ok_or_else(|| format!("arguments for tool call {index}, which never started"))?;
        if c.done {
            return Err(format!("arguments for tool call {index} after it ended"));
        }
        if fragment.is_empty() {
            return Ok(());
        }
        c.args.push_str(fragment);
        let ev = ProviderEvent::ToolCallDelta {
            id: c.id.clone(),
            fragment: fragment.to_string(),
        };
        (self.sink)(ev);
        Ok(())
    }

    /// Ends one call: checks that its arguments are a JSON object.
    pub fn call_done(&mut self, index: u64) {
        let Some(c) = self.calls.iter_mut().find(|c| c.index == index && !c.done) else {
            return;
        };
        c.done = true;
        // No arguments at all means "no arguments".
        let args = if c.args.trim().is_empty() {
            "{}".to_string()
        } else {
            std::mem::take(&mut c.args)
        };
        let malformed = match serde_json::from_str::<serde_json::Value>(&args) {
            Ok(v) if v.is_object() => None,
            Ok(_) => Some("the arguments are JSON but not an object".to_string()),
            Err(e) => Some(format!("the arguments are not valid JSON: {e}")),
        };
        let ev = match &malformed {
            None => ProviderEvent::ToolCallDone {
                id: c.id.clone(),
                name: c.name.clone(),
                arguments_json: args.clone(),
            },
            Some(error) => ProviderEvent::ToolCallMalformed {
                id: c.id.clone(),
                name: c.name.clone(),
                arguments_json: args.clone(),
                error: error.clone(),
            },
        };
        self.done_calls.push(ToolCall {
            id: c.id.clone(),
            name: c.name.clone(),
            arguments_json: args,
            malformed,
        });
        (self.sink)(ev);
    }

    /// Ends every open call (in order of their index).
    pub fn close_all_calls(&mut self) {
        let mut open: Vec<u64> = self
            .calls
            .iter()
            .filter(|c| !c.done)
            .map(|c| c.index)
            .collect();
        open.sort_unstable();
        for i in open {
            self.call_done(i);
        }
    }

    /// Updates the token counts that are present and reports the totals.
    pub fn usage(&mut self, input: Option<u64>, output: Option<u64>) {
        if input.is_none() && output.is_none() {
            return;
        }
        if let Some(i) = input {
            self.usage.input_tokens = i;
        }
        if let Some(o) = output {
            self.usage.output_tokens = o;
        }
        (self.sink)(ProviderEvent::Usage(self.usage));
    }

    pub fn stop(&mut self, reason: StopReason) {
        self.stop = Some(reason);
    }

    pub fn has_stop(&self) -> bool {
        self.stop.is_some()
    }

    /// The answer, after the `Done` event.
    pub fn finish(mut self) -> Collected {
        self.close_all_calls();
        let stop_reason = self.stop.take().unwrap_or(if self.done_calls.is_empty() {
            StopReason::EndTurn
        } else {
            StopReason::ToolUse
        });
        (self.sink)(ProviderEvent::Done {
            stop_reason: stop_reason.clone(),
        });
        Collected {
            text: self.text,
            tool_calls: self.done_calls,
            stop_reason,
            usage: self.usage,
        }
    }
}
