//! Builds the LLM prompt from a conversation: the system prompt (always
//! kept) and as many of the latest turns as fit the character budget,
//! oldest dropped first. The newest user turn is always sent.

use chatq_common::domain::{Message, Role};

use crate::llm::ChatMessage;

/// The prompt for a conversation whose messages are `history` (oldest
/// first), within `budget_chars` characters of message content.
pub fn build(
    system_prompt: Option<&str>,
    history: Vec<Message>,
    budget_chars: usize,
) -> Vec<ChatMessage> {
    let system = system_prompt
        .filter(|p| !p.is_empty())
        .map(|p| ChatMessage {
            role: "system",
            content: p.to_owned(),
        });
    let mut remaining =
        budget_chars.saturating_sub(system.as_ref().map_or(0, |s| s.content.chars().count()));
    let mut kept: Vec<ChatMessage> = Vec::new();
    for m in history.into_iter().rev() {
        let role = match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
            // Instructions given mid-conversation (the OpenAI facade stores
            // them); the leading ones are the conversation's system prompt.
            Role::System => "system",
        };
        let len = m.content.chars().count();
        if len > remaining && !kept.is_empty() {
            break;
        }
        remaining = remaining.saturating_sub(len);
        kept.push(ChatMessage {
            role,
            content: m.content,
        });
    }
    kept.reverse();
    system.into_iter().chain(kept).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use uuid::Uuid;

    fn msg(role: Role, content: &str) -> Message {
        Message {
            id: Uuid::now_v7(),
            role,
            content: content.to_owned(),
            job_id: None,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn keeps_everything_within_budget() {
        let h = vec![
            msg(Role::User, "a"),
            msg(Role::Assistant, "b"),
            msg(Role::User, "c"),
        ];
        let p = build(Some("sys"), h, 100);
        let got: Vec<(&str, &str)> = p.iter().map(|m| (m.role, m.content.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("system", "sys"),
                ("user", "a"),
                ("assistant", "b"),
                ("user", "c")
            ]
        );
    }

    #[test]
    fn drops_oldest_turns_first_but_keeps_system_prompt_and_last_turn() {
        let h = vec![
            msg(Role::User, "aaaa"),
            msg(Role::Assistant, "bbbb"),
            msg(Role::User, "cccc"),
        ];
        let p = build(Some("ss"), h, 10);
        let got: Vec<&str> = p.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(got, vec!["ss", "bbbb", "cccc"]);
        let p = build(None, vec![msg(Role::User, "way over the budget")], 3);
        assert_eq!(
            p.len(),
            1,
            "the newest turn is sent even when it alone exceeds the budget"
        );
    }
}
