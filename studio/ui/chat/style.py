"""The Chat tab's style sheet, in a light and a dark variant that match studio.ui.theme's palettes."""

from __future__ import annotations

ACCENT = "#e8704f"


def stylesheet(dark: bool) -> str:
    if dark:
        c = {"column": "#1e1f22", "user": "#3a2d28", "user_border": "#5a3f35", "bot": "#2b2d31",
             "border": "#3a3c42", "muted": "#9a9da3", "error_bg": "#3d2424", "error_border": "#a8443f",
             "notice": "#2f3136", "side": "#25262a", "input": "#2b2d31"}
    else:
        c = {"column": "#f4f4f6", "user": "#fdece5", "user_border": "#f3cdbf", "bot": "#ffffff",
             "border": "#dedee4", "muted": "#6b6e75", "error_bg": "#fdeceb", "error_border": "#e0a19d",
             "notice": "#fff6e5", "side": "#ececf0", "input": "#ffffff"}
    return f"""
#MessageColumn {{ background: {c['column']}; }}
QFrame#Bubble {{ border-radius: 10px; border: 1px solid {c['border']}; background: {c['bot']}; }}
QFrame#Bubble[role="user"] {{ background: {c['user']}; border-color: {c['user_border']}; }}
QFrame#Bubble[highlight="true"] {{ border: 2px solid {ACCENT}; }}
QLabel#BubbleRole {{ font-weight: 600; }}
QLabel#BubbleStatus {{ color: {c['muted']}; font-style: italic; padding-left: 6px; }}
QLabel#BubbleStatus[status="interrupted"], QLabel#BubbleStatus[status="error"] {{ color: #d9534f; }}
QLabel#BubbleStats, QLabel#ContextLabel {{ color: {c['muted']}; font-size: 9pt; }}
QToolButton#BubbleAction {{ color: {c['muted']}; padding: 1px 6px; }}
QToolButton#BubbleAction:hover {{ color: {ACCENT}; }}
QFrame#ErrorBox {{ background: {c['error_bg']}; border: 1px solid {c['error_border']}; border-radius: 6px; }}
QFrame#ChatHeader {{ border-bottom: 1px solid {c['border']}; }}
QLabel#ChatTitle {{ font-size: 12pt; font-weight: 600; }}
QFrame#ComposerBox {{ border-top: 1px solid {c['border']}; }}
QPlainTextEdit#Composer {{ background: {c['input']}; border: 1px solid {c['border']}; border-radius: 8px;
                           padding: 4px 6px; }}
QPlainTextEdit#Composer:focus {{ border-color: {ACCENT}; }}
QPushButton#SendButton {{ background: {ACCENT}; color: white; border: none; border-radius: 6px;
                          padding: 7px 20px; font-weight: 600; }}
QPushButton#SendButton[stop="true"] {{ background: #d9534f; }}
QPushButton#NewChat {{ padding: 6px; font-weight: 600; }}
QFrame#Notice {{ background: {c['notice']}; border-top: 1px solid {c['border']}; }}
QWidget#ThreadSidebar {{ background: {c['side']}; }}
QListWidget#Threads, QListWidget#SearchResults {{ border: none; background: transparent; }}
QListWidget#Threads::item {{ padding: 6px 6px; border-radius: 6px; }}
QListWidget#SearchResults::item {{ padding: 0; border-radius: 6px; }}
QListWidget#Threads::item:selected {{ background: {ACCENT}; color: white; }}
QListWidget#SearchResults::item:selected, QListWidget#SearchResults::item:hover {{ background: {c['border']}; }}
QFrame#SettingsPanel {{ border-left: 1px solid {c['border']}; }}
QLabel#PanelTitle {{ font-weight: 600; }}
QProgressBar#ContextBar {{ border: none; background: {c['border']}; border-radius: 3px; }}
QProgressBar#ContextBar::chunk {{ background: {ACCENT}; border-radius: 3px; }}
"""
