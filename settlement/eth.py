"""The chain client: a JSON-RPC connection and one account's locally signed transactions.

Why this shape: a node needs a handful of contract calls and must work
against any JSON-RPC endpoint, so every transaction is signed here with
eth_account and sent raw. The same client runs against an in-process py-evm
chain (tests, the Python API) or a real node such as anvil. Contract
bindings (settlement/contracts.py, settlement/rounds.py) build calls; this
module sends them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception
from web3.types import TxReceipt

__all__ = [
    "ChainError",
    "Signer",
    "embedded_web3",
    "fund_account",
    "guard",
    "http_web3",
    "mine_blocks",
]

RECEIPT_TIMEOUT_S = 60.0
"""How long to wait for a transaction to be mined before giving up."""

_GAS_HEADROOM_NUM, _GAS_HEADROOM_DEN = 6, 5  # +20 % over eth_estimateGas

_PLACEHOLDER_FEES = {"gas": 0, "gasPrice": 0}
"""Given to build_transaction so it makes no estimate / fee calls; _fill sets the real ones."""

_T = TypeVar("_T")


def _provider_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a node call may raise: web3's own, transport errors, and eth-tester's
    TransactionFailed (the in-process provider raises it for reverts instead of a web3 error)."""
    errors: tuple[type[BaseException], ...] = (Web3Exception, ValueError, OSError)
    try:
        from eth_tester.exceptions import TransactionFailed
    except ImportError:  # eth-tester is optional outside tests
        return errors
    return (*errors, TransactionFailed)


_PROVIDER_ERRORS = _provider_errors()


class ChainError(RuntimeError):
    """A chain call failed or reverted; the message names the call and the revert reason."""


def _reason(exc: BaseException) -> str:
    """A short human reason from a web3 / provider exception (never contains key material)."""
    if isinstance(exc, ContractLogicError) and exc.message:
        return str(exc.message)
    text = str(exc)
    return text if text.startswith("execution reverted") else f"{type(exc).__name__}: {text}"


def guard(what: str, call: Callable[[], _T]) -> _T:
    """Run a node call, turning provider exceptions into ChainError naming `what`."""
    try:
        return call()
    except ChainError:
        raise
    except _PROVIDER_ERRORS as exc:
        raise ChainError(f"{what} failed: {_reason(exc)}") from exc


def gas_price(w3: Web3) -> int:
    """Wei per gas a transaction pays now: base fee + tip where the chain has a base fee."""
    base_fee = w3.eth.get_block("latest").get("baseFeePerGas")
    return int(w3.eth.gas_price if base_fee is None else base_fee + w3.eth.max_priority_fee)


def _fill(w3: Web3, account: LocalAccount, tx: dict[str, Any]) -> dict[str, Any]:
    """Complete from/chainId/nonce/gas/fees from the node (EIP-1559 where it has a base fee)."""
    tx = dict(tx)
    tx.setdefault("from", account.address)
    tx.setdefault("chainId", w3.eth.chain_id)
    tx.setdefault("nonce", w3.eth.get_transaction_count(account.address, "pending"))
    if "gas" not in tx:
        estimate = w3.eth.estimate_gas(tx)  # type: ignore[arg-type]  # reverts surface here
        tx["gas"] = estimate * _GAS_HEADROOM_NUM // _GAS_HEADROOM_DEN
    if "gasPrice" not in tx and "maxFeePerGas" not in tx:
        base_fee = w3.eth.get_block("latest").get("baseFeePerGas")
        if base_fee is None:
            tx["gasPrice"] = w3.eth.gas_price
        else:
            tip = w3.eth.max_priority_fee
            tx["maxPriorityFeePerGas"] = tip
            tx["maxFeePerGas"] = 2 * base_fee + tip
    return tx


def _unfilled(tx: dict[str, Any]) -> dict[str, Any]:
    """Drop the placeholder gas/fee/nonce of build_transaction so _fill sets them in one place."""
    for key in ("gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "nonce"):
        tx.pop(key, None)
    return tx


def _replay(w3: Web3, tx: dict[str, Any], receipt: TxReceipt) -> str:
    """Best-effort revert reason of a mined failure, by re-running it as eth_call."""
    call = {k: tx[k] for k in ("from", "to", "value", "data", "gas") if k in tx}
    try:
        w3.eth.call(call, receipt["blockNumber"] - 1)  # type: ignore[arg-type]
    except _PROVIDER_ERRORS as exc:
        return _reason(exc)
    return "no revert reason (state changed since, or out of gas)"


class Signer:
    """One account on one chain: signs its transactions locally and sends them raw."""

    def __init__(self, w3: Web3, private_key: bytes) -> None:
        self.w3 = w3
        self._account: LocalAccount = Account.from_key(private_key)

    def __repr__(self) -> str:
        return f"Signer({self.address})"

    @property
    def address(self) -> str:
        """Checksummed address that signs the transactions."""
        return str(self._account.address)

    def send_raw(self, what: str, tx: dict[str, Any]) -> TxReceipt:
        """Fill, sign, send and wait; raise ChainError on revert or timeout."""
        tx = guard(what, lambda: _fill(self.w3, self._account, tx))
        signed = self._account.sign_transaction(tx)
        tx_hash = guard(what, lambda: self.w3.eth.send_raw_transaction(signed.raw_transaction))
        try:
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
        except TimeExhausted as exc:
            raise ChainError(
                f"{what}: tx {tx_hash.hex()} not mined in {RECEIPT_TIMEOUT_S}s"
            ) from exc
        if receipt["status"] != 1:
            reason = _replay(self.w3, tx, receipt)
            raise ChainError(f"{what} reverted on chain (tx {tx_hash.hex()}): {reason}")
        return receipt

    def transact(
        self, what: str, fn: ContractFunction, value: int = 0, gas: int | None = None
    ) -> TxReceipt:
        """Send a contract call as this account; `gas` None: estimated, plus 20 %."""
        tx = guard(
            what,
            lambda: fn.build_transaction(
                {"from": self.address, "value": value, **_PLACEHOLDER_FEES}
            ),
        )
        tx = _unfilled(tx)
        if gas is not None:
            tx["gas"] = gas
        return self.send_raw(what, tx)

    def estimate(self, what: str, fn: ContractFunction, value: int = 0) -> int:
        """eth_estimateGas of a call from this account (a revert raises ChainError)."""
        return int(guard(what, lambda: fn.estimate_gas({"from": self.address, "value": value})))

    def deploy(self, what: str, abi: list[dict[str, Any]], bytecode: str, *args: object) -> str:
        """Deploy a contract; return its checksummed address."""
        factory = self.w3.eth.contract(abi=abi, bytecode=bytecode)
        tx = guard(
            what,
            lambda: factory.constructor(*args).build_transaction(
                {"from": self.address, **_PLACEHOLDER_FEES}
            ),
        )
        receipt = self.send_raw(what, _unfilled(tx))
        address = receipt["contractAddress"]
        if address is None:
            raise ChainError(f"{what}: receipt has no contract address")
        return str(address)


def receipt_cost(receipt: TxReceipt) -> int:
    """Wei the sender paid in gas for a mined transaction."""
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def tx_hash_hex(receipt: TxReceipt) -> str:
    return "0x" + bytes(receipt["transactionHash"]).hex()


# -- connections -------------------------------------------------------------------------


def http_web3(url: str, timeout_s: float = 30.0) -> Web3:
    """A Web3 connected to a JSON-RPC node over HTTP (anvil, geth, an Arbitrum RPC, ...)."""
    return Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout_s}))


def embedded_web3() -> Web3:
    """An in-process py-evm chain with prefunded, unlocked accounts; blocks mine per tx."""
    from eth_tester import EthereumTester, PyEVMBackend  # test-only dependency

    return Web3(Web3.EthereumTesterProvider(EthereumTester(PyEVMBackend())))


def fund_account(w3: Web3, address: str, wei: int) -> TxReceipt:
    """Send `wei` from the node's first unlocked dev account (eth-tester or anvil) to `address`."""
    funder = w3.eth.accounts[0]
    tx_hash = guard(
        "fund_account",
        lambda: w3.eth.send_transaction(
            {"from": funder, "to": to_checksum_address(address), "value": wei}
        ),
    )
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
    if receipt["status"] != 1:
        raise ChainError(f"fund_account: transfer to {address} failed")
    return receipt


def mine_blocks(w3: Web3, count: int) -> None:
    """Advance the chain by `count` empty blocks (eth-tester or anvil), e.g. to end a round."""
    tester = getattr(w3.provider, "ethereum_tester", None)
    if tester is not None:
        tester.mine_blocks(count)
        return
    response = w3.provider.make_request("anvil_mine", [hex(count)])  # type: ignore[arg-type]
    if "error" in response:
        raise ChainError(f"mine_blocks: node refused anvil_mine: {response['error']}")
