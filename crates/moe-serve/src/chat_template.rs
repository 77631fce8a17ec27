//! Chat templates: how a list of chat messages becomes the prompt text the model continues.

use crate::openai::ChatMessage;

/// A chat prompt format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChatTemplate {
    /// ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
    /// `<|im_start|>assistant\n` for the answer. System messages (where Mixture-of-Agents
    /// puts its references) are rendered like any other.
    #[default]
    ChatMl,
    /// Plain text: `{role}: {content}\n\n` per message, then `assistant:`; for models
    /// trained on prose, which have never seen ChatML's markers.
    Plain,
}

impl ChatTemplate {
    /// The prompt for `messages`, ending where the assistant's answer starts.
    pub fn render(self, messages: &[ChatMessage]) -> String {
        let mut prompt = String::new();
        for message in messages {
            let content = message.content.text();
            match self {
                Self::ChatMl => {
                    prompt.push_str(&format!(
                        "<|im_start|>{}\n{content}<|im_end|>\n",
                        message.role
                    ));
                }
                Self::Plain => prompt.push_str(&format!("{}: {content}\n\n", message.role)),
            }
        }
        prompt.push_str(match self {
            Self::ChatMl => "<|im_start|>assistant\n",
            Self::Plain => "assistant:",
        });
        prompt
    }

    /// Strings that end the assistant's turn: the answer stops before them.
    pub fn stop_strings(self) -> &'static [&'static str] {
        match self {
            Self::ChatMl => &["<|im_end|>", "<|im_start|>"],
            Self::Plain => &["\nuser:", "\nsystem:"],
        }
    }
}

impl std::str::FromStr for ChatTemplate {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "chatml" => Ok(Self::ChatMl),
            "plain" => Ok(Self::Plain),
            other => Err(format!(
                "unknown chat template `{other}` (expected chatml or plain)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::MessageContent;

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: MessageContent::Text(content.into()),
        }
    }

    #[test]
    fn chatml_renders_every_message_then_opens_the_answer() {
        let messages = [
            message("system", "Use the references:\n1. Rome"),
            message("user", "Capital of Italy?"),
        ];
        assert_eq!(
            ChatTemplate::ChatMl.render(&messages),
            "<|im_start|>system\nUse the references:\n1. Rome<|im_end|>\n\
             <|im_start|>user\nCapital of Italy?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            ChatTemplate::Plain.render(&messages[1..]),
            "user: Capital of Italy?\n\nassistant:"
        );
        assert_eq!("plain".parse(), Ok(ChatTemplate::Plain));
        assert!("llama".parse::<ChatTemplate>().is_err());
    }
}
